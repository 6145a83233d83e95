"""Counter videos: synthetic H.264 files of any length and size whose every frame shows its own
frame number as a row of black/white bit blocks, for checking that a seek lands on the frame asked
for (tests, bench/encode.py).

Cheap to make at 1080p x minutes: the luma planes are written directly (no RGB conversion), the
content is low-complexity (a fixed gradient plus the bit row), and x264 runs with its fastest
preset and a keyframe only every `gop` frames, as in camera and web video.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BITS = 16  # frame numbers up to 65535


def _block(height: int, width: int, bit: int) -> tuple[slice, slice]:
    """(rows, cols) of bit `bit`'s block: one of BITS equal cells across the top of the frame."""
    cell = width // (BITS + 2)
    size = max(4, min(cell, height // 4))
    return slice(size // 2, size // 2 + size), slice(cell * (bit + 1), cell * (bit + 1) + size)


def write_counter_video(path: str | Path, frames: int, fps: float, height: int, width: int,
                        gop: int = 250, times: Sequence[float] | None = None) -> None:
    """An mp4 of `frames` frames height x width (even sizes) at `fps`, keyframes every `gop`;
    `times` (seconds, one per frame, increasing) makes it a variable-frame-rate video."""
    if height % 2 or width % 2 or width < 4 * (BITS + 2) or frames > 2**BITS:
        raise ValueError(f"counter video needs even sizes, width >= {4 * (BITS + 2)} and at "
                         f"most {2**BITS} frames; got {height}x{width}, {frames} frames")
    base = np.tile(np.linspace(60, 190, width).astype(np.uint8), (height, 1))
    chroma = np.full((height // 2, width // 2), 128, np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28", "g": str(gop),
                          "keyint_min": str(gop), "sc_threshold": "0"}
        if times is not None:  # timestamps in milliseconds
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for number in range(frames):
            luma = base.copy()
            for bit in range(BITS):
                luma[_block(height, width, bit)] = 235 if (number >> bit) & 1 else 16
            frame = av.VideoFrame(width, height, "yuv420p")
            for plane, data in zip(frame.planes, (luma, chroma, chroma), strict=True):
                _fill(plane, data)
            frame.pts = number if times is None else round(1000 * times[number])
            if times is not None:
                frame.time_base = Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _fill(plane, data: np.ndarray) -> None:
    """Copies rows of `data` into a frame plane whose rows may be padded (line_size >= width)."""
    padded = np.zeros((data.shape[0], plane.line_size), np.uint8)
    padded[:, :data.shape[1]] = data
    plane.update(padded.tobytes())


def frame_number(image: np.ndarray) -> int:
    """The number a counter video's frame shows; image uint8 [H, W, 3] at the native size."""
    height, width = image.shape[:2]
    bits = [image[_block(height, width, bit)].mean() > 125 for bit in range(BITS)]
    return sum(1 << bit for bit, on in enumerate(bits) if on)
