"""Streaming decode for curation: one pass over a file, frames downscaled as they are decoded,
yielded in segments of bounded length so a long video never sits in memory whole.

A segment is the unit of work (and of resuming): cuts, scores and clips are computed per
segment; its frames are numbered from the start of the video (`start_frame`). A video shorter
than `max_segment_seconds` is one segment. Unreadable files, and files that fail part way, raise
`VideoReadError` (from `vdit.data.video_io`) naming the file, so the caller can count and skip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from vdit.data.video_io import VideoReadError, quarter_turns, upright


@dataclasses.dataclass(frozen=True)
class Segment:
    index: int  # 0, 1, ... within the video
    start_frame: int  # first frame's number in the whole video
    frames: np.ndarray  # uint8 [T, H, W, 3], upright (the file's display rotation applied)
    fps: float
    last: bool  # no segment follows


def target_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) scaled down so min(height, width) <= short_side (0 = unchanged); even,
    since most codecs want even sizes."""
    if not short_side or min(height, width) <= short_side:
        return height, width
    scale = short_side / min(height, width)
    return max(2, 2 * round(height * scale / 2)), max(2, 2 * round(width * scale / 2))


def iter_segments(path: str | Path, cfg) -> Iterator[Segment]:
    """Segments of the video at `path`; cfg is `config.curate.decode`."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"cannot read video {path}: file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise VideoReadError(f"cannot read video {path}: {e}") from e
    with container:
        if not container.streams.video:
            raise VideoReadError(f"cannot read video {path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else float(cfg.default_fps)
        yield from _segments(path, container.decode(stream), fps, cfg)


def _segments(path: Path, decoded, fps: float, cfg) -> Iterator[Segment]:
    length = max(1, round(cfg.max_segment_seconds * fps))
    buffer: list[np.ndarray] = []
    index = start = 0
    size = None
    try:
        for frame in decoded:
            if size is None:
                size = target_size(frame.height, frame.width, cfg.short_side)
            image = frame.to_ndarray(height=size[0], width=size[1], format="rgb24",
                                     interpolation="AREA")
            buffer.append(upright(image, quarter_turns(frame)))
            # One frame of look-ahead, so the final segment is always marked `last`.
            if len(buffer) > length:
                yield Segment(index, start, np.stack(buffer[:length]), fps, last=False)
                buffer, index, start = buffer[length:], index + 1, start + length
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise VideoReadError(f"cannot read video {path} (failed after frame "
                             f"{start + len(buffer)}): {e}") from e
    if not buffer:
        raise VideoReadError(f"cannot read video {path}: no decodable frames")
    yield Segment(index, start, np.stack(buffer), fps, last=True)
