"""Test videos with known content for the curation tests: shot sequences with a hard cut, a fade
through black and a dissolve at known frames (from the synthetic shapes world), pans of a
multi-scale texture at a known speed, and hard cuts between pans of soft 1/f textures."""

from __future__ import annotations

import cv2
import numpy as np

from vdit.data.synthetic import SyntheticShapes
from vdit.data.video_io import to_uint8


def texture(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth multi-scale (roughly 1/f) RGB texture, uint8 [height, width, 3]."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), np.float32)
    for sigma in (1, 2, 4, 8, 16, 32):
        layer = cv2.GaussianBlur(rng.normal(0, 1, (height, width, 3)).astype(np.float32),
                                 (0, 0), sigma)
        out += layer / layer.std() * sigma ** 0.5
    out = (out - out.mean()) / out.std() * 45 + 128
    return np.clip(out, 0, 255).astype(np.uint8)


def pink(seed: int, height: int, width: int) -> np.ndarray:
    """A 1/f (natural-image-like) RGB texture from random Fourier phases, uint8 [height, width,
    3], each channel around its own mean colour."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None]
    amp = 1 / np.maximum(np.hypot(fy, fx), 1 / max(height, width))
    channels = []
    for _ in range(3):
        img = np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((height, width)))))
        channels.append((img - img.mean()) / img.std())
    img = np.stack(channels, -1) * 40 + rng.integers(60, 190, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def cut_between_pans(seeds: tuple[int, int], blur: float, px_per_frame: int, frames: int = 90,
                     cut: int = 45, height: int = 120, width: int = 160) -> np.ndarray:
    """A hard cut at frame `cut` between two pans (px_per_frame to the right) over two unrelated
    1/f textures, defocused by a Gaussian blur of `blur` pixels: soft, low-detail shots."""
    a, b = (cv2.GaussianBlur(pink(s, height, 4 * width), (0, 0), blur) for s in seeds)
    return np.stack([(a if i < cut else b)[:, i * px_per_frame:i * px_per_frame + width]
                     for i in range(frames)])


def pan(px_per_frame: float, frames: int = 48, height: int = 96, width: int = 128,
        seed: int = 0) -> np.ndarray:
    """A camera pan: the window slides right over a texture by px_per_frame pixels a frame."""
    big = texture(seed, height, width + int(np.ceil(abs(px_per_frame) * frames)) + 2)
    return np.stack([big[:, round(i * px_per_frame):round(i * px_per_frame) + width]
                     for i in range(frames)])


def scenes(count: int, frames: int, fps: float, height: int = 64, width: int = 96,
           seed: int = 0) -> list[np.ndarray]:
    """`count` different synthetic scenes, uint8 [frames, height, width, 3] each."""
    rendered = 1 + 4 * int(np.ceil((frames - 1) / 4))  # the shapes world renders 1 + 4k frames
    src = SyntheticShapes(frames=rendered, height=height, width=width, fps=fps, seed=seed,
                          speed_range=(0.3, 0.5))
    return [to_uint8(src.render(i)["video"])[:frames] for i in range(count)]


def shot_sequence(fps: float, shot: int = 33, fade: int = 8, dissolve: int = 10,
                  height: int = 64, width: int = 96) -> tuple[np.ndarray, dict[str, float]]:
    """Four shots of `shot` frames: A | hard cut | B, fading out over `fade` frames and C fading
    in over `fade` frames (through black) | C, dissolving into D over `dissolve` frames.
    Returns (video uint8 [T, H, W, 3], true boundary frame per kind)."""
    a, b, c, d = (s.astype(np.float32) for s in scenes(4, shot, fps, height, width))
    ramp = np.linspace(1.0, 0.0, fade)[:, None, None, None]
    b[-fade:] *= ramp
    c[:fade] *= ramp[::-1]
    w = np.linspace(0.0, 1.0, dissolve + 2)[1:-1, None, None, None]
    cd = np.concatenate([c[:-dissolve], (1 - w) * c[-dissolve:] + w * d[:dissolve],
                         d[dissolve:]])
    video = np.concatenate([a, b, cd]).round().astype(np.uint8)
    truth = {"cut": shot, "fade": 2 * shot, "dissolve": 3 * shot - dissolve / 2}
    return video, truth


def add_text(video: np.ndarray, text: str = "Hello subtitles here") -> np.ndarray:
    """Burns a white subtitle line into the bottom of every frame."""
    out = video.copy()
    h, w = out.shape[1:3]
    for frame in out:
        cv2.putText(frame, text, (int(0.08 * w), int(0.92 * h)), cv2.FONT_HERSHEY_SIMPLEX,
                    h / 288, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def make_upper_captioner(arg: str):
    """A captioner factory (config: captions.captioner = "curate_testing:make_upper_captioner")."""
    return lambda frames, caption: f"{arg}: {caption.upper()} ({len(frames)} frames)"
