"""Streaming decode for curation: one pass over a file, frames downscaled as they are decoded,
yielded in segments of bounded length so a long video never sits in memory whole.

A segment is the unit of work (and of resuming): cuts, scores and clips are computed per
segment; its frames are numbered from the start of the video (`start_frame`), in presentation
order, as `vdit encode` numbers a clips.jsonl line's frames. A video shorter than
`max_segment_seconds`, whose decoded frames fit in `max_segment_mb`, is one segment. Frames are
as players show them: upright (display rotation applied), anamorphic pixels widened; a
variable-frame-rate segment keeps each frame's time.
Unreadable files (also an audio file whose only picture is its cover art), and files that fail
part way, raise `VideoReadError` (from `vdit.data.video_io`) naming the file, so the caller can
count and skip."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from vdit.data.video_io import VideoReadError, pixel_aspect, quarter_turns, shown_size, upright, video_stream


@dataclasses.dataclass(frozen=True)
class Segment:
    index: int  # 0, 1, ... within the video
    start_frame: int  # first frame's number in the whole video
    frames: np.ndarray  # uint8 [T, H, W, 3], upright (the file's display rotation applied)
    fps: float  # the video's average frame rate
    last: bool  # no segment follows
    # None when frame k is at (start_frame + k) / fps (constant rate, or no timestamps); else
    # float64 [T + 1]: seconds from the video's first frame to each frame and to the last's end
    times: np.ndarray | None = None

    def span(self, start: int, end: int) -> tuple[float, float, float]:
        """(start, end) in seconds of frames [start, end), and their frame rate."""
        if self.times is None:
            first = self.start_frame + start
            return first / self.fps, (self.start_frame + end) / self.fps, self.fps
        t0, t1 = float(self.times[start]), float(self.times[end])
        return t0, t1, (end - start) / (t1 - t0)


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
        stream = video_stream(container, path)
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else float(cfg.default_fps)
        yield from _segments(path, container.decode(stream), fps, pixel_aspect(stream), cfg)


def segment_length(cfg, fps: float, frame_shape) -> int:
    """Frames in a segment: `max_segment_seconds` of video, fewer when their decoded bytes would
    exceed `max_segment_mb` (0 = no such bound): 300 s of 1080p is ~56 GB decoded."""
    length = max(1, round(cfg.max_segment_seconds * fps))
    budget = float(cfg.get("max_segment_mb", 0.0) or 0.0) * 2**20
    return min(length, max(1, int(budget // np.prod(frame_shape)))) if budget else length


def _segments(path: Path, decoded, fps: float, aspect: float, cfg) -> Iterator[Segment]:
    frames = None  # [length + 1, H, W, 3]: decoded into in place (a list + np.stack held twice)
    count = 0  # frames in `frames`
    stamps: list[float | None] = []  # seconds of the buffered frames (None: no timestamp)
    index = start = length = 0
    size = origin = None
    try:
        for frame in decoded:
            turns = quarter_turns(frame)
            if size is None:  # the frame as stored, scaled to the size it is shown at
                origin = frame.time
                size = target_size(*shown_size(frame.height, frame.width, aspect), cfg.short_side)
            image = upright(frame.to_ndarray(height=size[0], width=size[1], format="rgb24",
                                             interpolation="AREA"), turns)
            if frames is None:
                length = segment_length(cfg, fps, image.shape)
                frames = np.empty((length + 1, *image.shape), np.uint8)
            frames[count] = image  # a frame of another shape: ValueError, the file is unreadable
            count += 1
            stamps.append(frame.time)
            # One frame of look-ahead, so the final segment is always marked `last` (and the
            # next frame's time ends the segment's last frame).
            if count > length:
                times = _frame_times(stamps, start, fps, origin)
                yield Segment(index, start, frames[:length], fps, last=False,
                              times=None if times is None else times[:length + 1])
                frames, head = np.empty_like(frames), frames[length]
                frames[0], count, stamps = head, 1, stamps[length:]
                index, start = index + 1, start + length
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise VideoReadError(f"cannot read video {path} (failed after frame "
                             f"{start + count}): {e}") from e
    if not count:
        raise VideoReadError(f"cannot read video {path}: no decodable frames")
    times = _frame_times(stamps + [None], start, fps, origin)
    yield Segment(index, start, frames[:count], fps, last=True, times=times)


# Timestamps within this fraction of a frame of the constant-rate grid count as constant rate
# (containers round them to their time base).
CONSTANT_RATE_TOLERANCE = 0.25


def _frame_times(stamps: list[float | None], start: int, fps: float,
                 origin: float | None) -> np.ndarray | None:
    """Segment.times of the frames numbered from `start` whose stream times are `stamps` (a
    trailing None: the video ends after them), `origin` the video's first frame's time: None when
    every frame sits on the constant-rate grid or some frame has no usable timestamp. The last
    frame ends at the next frame's time when known, else as long after as the frame before it."""
    known = stamps[:-1] if stamps[-1] is None else stamps
    if origin is None or any(t is None for t in known):
        return None
    t = np.asarray(known, np.float64) - origin
    grid = (start + np.arange(len(t))) / fps
    if len(t) < 2 or np.any(np.diff(t) <= 0) or np.all(
            np.abs(t - grid) < CONSTANT_RATE_TOLERANCE / fps):
        return None
    if len(known) < len(stamps):
        t = np.append(t, 2 * t[-1] - t[-2])
    return t
