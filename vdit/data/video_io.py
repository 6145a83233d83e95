"""Video files and frame arrays: read/write mp4 (PyAV, H.264) and gif, resize/crop, frame
sampling, grid previews.

Arrays are channels-last `[T, H, W, 3]`, either uint8 or float in [-1, 1] (the model's range).
Unreadable or corrupt files raise `VideoReadError` naming the file, so callers can count and skip.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from numbers import Real
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image, ImageOps


class VideoReadError(OSError):
    """A video file is missing, corrupt or holds no decodable video frames."""


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
        raise ValueError(f"expected a video [T, H, W, 3] with T >= 1, got shape {video.shape}")
    return video


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 (returned as is) or float in [-1, 1] (clipped) -> uint8."""
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video
    if not np.issubdtype(video.dtype, np.floating):
        raise ValueError(f"expected uint8 or float pixels, got dtype {video.dtype}")
    return np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def to_float(video: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1] (float input is returned as float32)."""
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 127.5 - 1.0
    return video.astype(np.float32)


# Single-channel modes deeper than 8 bits, with the value that is white: Pillow's convert("RGB")
# clips them at 255 (a mid-grey 16-bit PNG turned white) instead of scaling.
_DEEP_GRAY = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0,
              "I": 65535.0, "F": 1.0}


def image_rgb(img: Image.Image) -> np.ndarray:
    """An opened image -> uint8 [H, W, 3], upright: a photo's EXIF orientation (phones store
    portraits as rotated landscapes) is applied, as diffusers' load_image does. 16-bit grey
    (0..65535) and float grey (0..1) images are scaled to 8 bits, not clipped."""
    img = ImageOps.exif_transpose(img)
    white = _DEEP_GRAY.get(img.mode)
    if white is None:
        return np.asarray(img.convert("RGB"))
    gray = np.asarray(img, np.float64) * (255.0 / white)
    gray = np.clip(np.round(np.nan_to_num(gray)), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def quarter_turns(frame: av.VideoFrame) -> int:
    """Counterclockwise quarter turns that make a decoded frame upright (0-3): phones store
    portrait video as landscape frames with a display rotation, which players apply."""
    return round(float(frame.rotation or 0) / 90.0) % 4


def upright(image: np.ndarray, turns: int) -> np.ndarray:
    """image [H, W, C] rotated by `turns` counterclockwise quarter turns (see quarter_turns)."""
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


# Transfer characteristics (ISO/IEC 23091-2, FFmpeg's AVColorTransferCharacteristic) of HDR
# video: PQ (SMPTE ST 2084) and HLG (ARIB STD-B67), a phone's default HDR recording.
HDR_TRANSFERS = {16: "PQ", 18: "HLG"}


def video_stream(container, path) -> av.video.stream.VideoStream:
    """The container's first video stream that is not an attached picture: an audio file's cover
    art is a one-frame "video" stream, not a video. Raises VideoReadError naming `path`; also
    for HDR video, which decodes to washed-out RGB without a tone map (none is applied here)."""
    pictures = 0
    for stream in container.streams.video:
        if stream.disposition & av.stream.Disposition.attached_pic:
            pictures += 1
            continue
        hdr = HDR_TRANSFERS.get(int(stream.codec_context.color_trc or 0))
        if hdr:
            raise VideoReadError(
                f"cannot read video {path}: HDR ({hdr} transfer); vdit reads SDR video and does "
                "not tone-map, so its frames would come out washed out: convert it to SDR "
                "(BT.709) first, e.g. with ffmpeg's zscale and tonemap filters")
        return stream
    detail = f" (only {pictures} attached cover picture{'s' * (pictures > 1)})" if pictures else ""
    raise VideoReadError(f"cannot read video {path}: no video stream{detail}")


def pixel_aspect(stream) -> float:
    """How many times wider than tall a stored pixel is shown (anamorphic video; 1.0 for square
    pixels or when the file does not say)."""
    return float(stream.sample_aspect_ratio or 1) or 1.0


def shown_size(height: int, width: int, aspect: float) -> tuple[int, int]:
    """(height, width) of a stored height x width frame as players show it before any display
    rotation: anamorphic pixels widened by `aspect`."""
    return height, max(1, round(width * aspect))


# Frame rates a written file can carry: mp4 stores 1/fps in a 1/1001-limited fraction, gif whole
# centiseconds per frame in 16 bits (at most 655 s).
FPS_RANGE = (0.01, 1000.0)


def check_fps(fps: float, what: str = "fps") -> float:
    low, high = FPS_RANGE
    if isinstance(fps, bool) or not isinstance(fps, Real) or not low <= fps <= high:  # NaN too
        raise ValueError(f"{what} {fps!r}: expected a frame rate in [{low:g}, {high:g}]")
    return float(fps)


def write_mp4(path: str | Path, video: np.ndarray, fps: float, crf: int = 18) -> None:
    """H.264 (libx264, yuv420p) mp4 of a video [T, H, W, 3]; H and W must be even (yuv420p)."""
    frames = to_uint8(_check_video(video))
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"mp4 (yuv420p) needs even height and width, got {height}x{width}; "
                         "crop or resize first")
    fps = check_fps(fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # one x264 thread: threaded encodes of the same frames differ run to run (2 levels on
        # average), which moved a judged sample of `make demo` between two identical runs
        stream.options = {"crf": str(crf), "threads": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def write_gif(path: str | Path, video: np.ndarray, fps: float) -> None:
    """Looping gif of a video [T, H, W, 3] (Pillow; palette per frame)."""
    frames = to_uint8(_check_video(video))
    fps = check_fps(fps)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(str(path), save_all=True, append_images=images[1:],
                   duration=max(int(round(1000.0 / fps)), 10), loop=0)


def write_video(path: str | Path, video: np.ndarray, fps: float) -> None:
    """Writes by suffix: .mp4 or .gif."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mp4":
        write_mp4(path, video, fps)
    elif suffix == ".gif":
        write_gif(path, video, fps)
    else:
        raise ValueError(f"cannot write {path}: unsupported suffix {suffix!r} (use .mp4 or .gif)")


def load_video(path: str | Path, as_float: bool = False, first: int | None = None,
               cover: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    """(frames [T, H, W, 3] uint8, or float in [-1, 1] if as_float; frames per second), as players
    show them: upright (the display rotation applied), anamorphic pixels widened. `first`: decode
    only that many frames; `cover` (height, width): shrink each frame as it is decoded to the
    smallest size that still covers it (never enlarged; the aspect kept), so a minute of 4K is
    never held at full size (~45 GB as uint8)."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"cannot read video {path}: file not found")
    try:
        with av.open(str(path)) as container:
            stream = video_stream(container, path)
            rate = stream.average_rate or stream.guessed_rate
            aspect = pixel_aspect(stream)
            frames = [_upright_shown(f, aspect, cover)
                      for f in itertools.islice(container.decode(stream), first)]
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise VideoReadError(f"cannot read video {path}: {e}") from e
    if not frames:
        raise VideoReadError(f"cannot read video {path}: no decodable frames")
    video = np.stack(frames)
    fps = float(rate) if rate else 0.0
    return (to_float(video) if as_float else video), fps


def _upright_shown(frame: av.VideoFrame, aspect: float, cover: tuple[int, int] | None):
    turns = quarter_turns(frame)
    return upright(_shown(frame, aspect, cover, turns), turns)


def _shown(frame: av.VideoFrame, aspect: float, cover: tuple[int, int] | None = None,
           turns: int = 0) -> np.ndarray:
    """A decoded frame as uint8 RGB [H, W', 3] at its shown aspect (see shown_size), shrunk to
    the smallest size that covers `cover` (height, width) once turned upright by `turns`."""
    height, width = shown_size(frame.height, frame.width, aspect)
    if cover is not None:
        want = cover if turns % 2 == 0 else cover[::-1]  # the target, in the stored orientation
        scale = max(want[0] / height, want[1] / width)
        if scale < 1:
            height, width = (max(n, math.ceil(m * scale)) for n, m in zip(want, (height, width)))
            return frame.to_ndarray(height=height, width=width, format="rgb24",
                                    interpolation="AREA")
    if (height, width) == (frame.height, frame.width):
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(height=height, width=width, format="rgb24",
                            interpolation="AREA" if aspect < 1 else "BICUBIC")


def probe_video(path: str | Path) -> tuple[int, int]:
    """(height, width) of the first frame of `path` as players show it (upright, anamorphic
    pixels widened); VideoReadError unless the file has a video stream and that frame decodes."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"cannot read video {path}: file not found")
    try:
        with av.open(str(path)) as container:
            stream = video_stream(container, path)
            frame = next(container.decode(stream), None)
            if frame is None:
                raise VideoReadError(f"cannot read video {path}: no decodable frames")
            size = shown_size(frame.height, frame.width, pixel_aspect(stream))
            return size if quarter_turns(frame) % 2 == 0 else size[::-1]
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise VideoReadError(f"cannot read video {path}: {e}") from e


def read_video(path: str | Path, as_float: bool = False) -> np.ndarray:
    """Frames [T, H, W, 3] of a video file: uint8, or float in [-1, 1] if as_float."""
    return load_video(path, as_float)[0]


def resize_video(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes every frame of [T, H, W, 3] (area filter when shrinking, cubic when growing)."""
    video = _check_video(video)
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    shrink = height * width < video.shape[1] * video.shape[2]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    out = np.stack([cv2.resize(f, (width, height), interpolation=interp) for f in video])
    if np.issubdtype(video.dtype, np.floating):
        out = np.clip(out, -1.0, 1.0)  # cubic overshoot
    return out.astype(video.dtype)


def center_crop(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central height x width window of [T, H, W, 3]."""
    video = _check_video(video)
    _, h, w, _ = video.shape
    if not (0 < height <= h and 0 < width <= w):
        raise ValueError(f"crop {height}x{width} does not fit in frames of {h}x{w}")
    top, left = (h - height) // 2, (w - width) // 2
    return video[:, top:top + height, left:left + width]


def resize_and_crop(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scales [T, H, W, 3] so it covers height x width (keeping aspect), then center-crops."""
    video = _check_video(video)
    _, h, w, _ = video.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    return center_crop(resize_video(video, new_h, new_w), height, width)


def sample_indices(num_source: int, source_fps: float, frames: int, target_fps: float,
                   start_time: float = 0.0) -> np.ndarray:
    """Indices [frames] of source frames nearest to times start_time + k / target_fps.

    Raises ValueError if the clip (num_source frames at source_fps) is too short.
    """
    if source_fps <= 0 or target_fps <= 0:
        raise ValueError(f"fps must be > 0, got source {source_fps}, target {target_fps}")
    if frames < 1 or start_time < 0:
        raise ValueError(f"need frames >= 1 and start_time >= 0, got {frames}, {start_time}")
    times = start_time + np.arange(frames) / target_fps
    idx = np.floor(times * source_fps + 0.5 + 1e-6).astype(np.int64)
    if idx[-1] >= num_source:
        span = (frames - 1) / target_fps
        raise ValueError(f"clip of {num_source} frames at {source_fps} fps is too short for "
                         f"{frames} frames at {target_fps} fps from t={start_time:.3f}s "
                         f"(needs {span:.3f}s after it)")
    return idx


def max_start_time(num_source: int, source_fps: float, frames: int, target_fps: float) -> float:
    """Latest start_time for which sample_indices fits in the clip (negative: never fits)."""
    return (num_source - 1) / source_fps - (frames - 1) / target_fps


def grid_image(videos: Sequence[np.ndarray] | np.ndarray, max_frames: int = 8,
               pad: int = 2) -> np.ndarray:
    """uint8 image [rows, cols, 3]: one row per video, up to max_frames evenly spaced frames
    side by side; videos may differ in size (cells are padded to the largest)."""
    if len(videos) == 0:
        raise ValueError("grid_image needs at least one video")
    videos = [to_uint8(_check_video(v)) for v in videos]
    cols = min(max_frames, max(len(v) for v in videos))
    cell_h = max(v.shape[1] for v in videos)
    cell_w = max(v.shape[2] for v in videos)
    grid = np.full((len(videos) * (cell_h + pad) + pad, cols * (cell_w + pad) + pad, 3), 255,
                   np.uint8)
    for r, v in enumerate(videos):
        picks = np.unique(np.linspace(0, len(v) - 1, min(cols, len(v))).round().astype(int))
        for c, t in enumerate(picks):
            y, x = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
            grid[y:y + v.shape[1], x:x + v.shape[2]] = v[t]
    return grid


def write_grid_png(path: str | Path, videos: Sequence[np.ndarray] | np.ndarray,
                   max_frames: int = 8, pad: int = 2) -> None:
    """Saves `grid_image(videos)` as a PNG (a batch [B, T, H, W, 3] or a list of videos)."""
    Image.fromarray(grid_image(videos, max_frames, pad)).save(str(path), format="PNG")


def manifest_lines(path):
    """(line number, parsed object, raw text) per non-blank line of a jsonl video manifest; a line
    that is not JSON is an error naming the file and line."""
    for number, text in enumerate(read_text(path).splitlines(), 1):
        if not text.strip():
            continue
        try:
            yield number, json.loads(text), text
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {path} line {number} is not JSON: {e}") from e


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (caption sidecar, manifest) without the byte-order mark some editors
    write first, which would otherwise begin a caption or break a JSON line."""
    return Path(path).read_text(encoding="utf-8-sig")


def find_videos(folder: str | Path, extensions: Sequence[str]) -> list[Path]:
    """Files under `folder` whose suffix is in `extensions` (any case), sorted; linked folders are
    followed (each real folder once, under its own name when it is inside `folder` too, so a
    link cycle ends and a link never renames videos) and links to missing files are listed too,
    so callers can count them rather than lose them."""
    exts = {e.lower() for e in extensions}
    found, seen, links = [], set(), []

    def take(root, dirs, files, follow: bool) -> None:
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            return
        seen.add(real)
        if not follow:
            links.extend(os.path.join(root, d) for d in dirs if os.path.islink(os.path.join(root, d)))
        found.extend(Path(root) / name for name in files if Path(name).suffix.lower() in exts)

    for root, dirs, files in os.walk(folder):  # the real folders first: their names win
        take(root, dirs, files, follow=False)
    for link in sorted(links):
        for root, dirs, files in os.walk(link, followlinks=True):
            take(root, dirs, files, follow=True)
    return sorted(found)
