"""Bounded-memory clip decode: a few frames of a video file, resized while decoding, after a seek
to the keyframe before the first one; a long high-resolution video never sits in memory whole.

`VideoReader(path)` opens a file and knows its frame count and each frame's time (`times`,
seconds from the first frame), from the demuxed packets (which decodes nothing), and its average
fps; `reader.read(indices, height, width)` returns frames [T, height, width, 3] uint8 at those
source frame numbers, each scaled while it is decoded (PyAV/swscale: area filter when shrinking,
bicubic when growing) to cover height x width and center-cropped; with a `ContentBox` (the
picture inside black bars, as `vdit curate` measures it) only that part is scaled and cropped.
Frames are numbered from the start of the video in presentation order, as `vdit curate` numbers
them: by the rank of the frame's timestamp among the packets' after a seek (right for variable
frame rates, where timestamp x average fps repeats and skips numbers), by counting when the file
has no timestamps or its seek lands past the first wanted frame (then decoding restarts from the
first frame; still one frame held at a time). Memory is O(T x height x width) plus the decoder's
reference frames, independent of the video's length and native resolution. Frames come as players
show them: upright (a phone's display rotation applied) and at the display aspect (anamorphic
pixels widened). Unreadable files, and files that fail part way, raise `VideoReadError` naming the
file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np

from vdit.data.video_io import VideoReadError, pixel_aspect, quarter_turns, shown_size, upright, video_stream

AV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)


def cover_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(h, w) of a height x width frame scaled (aspect kept) to cover target_h x target_w."""
    scale = max(target_h / height, target_w / width)
    return max(target_h, round(height * scale)), max(target_w, round(width * scale))


class ContentBoxError(ValueError):
    """A content box measured on a frame of another aspect than the video's."""


@dataclasses.dataclass(frozen=True)
class ContentBox:
    """Black bars (top, bottom, left, right rows/columns) of an upright frame as seen at
    `height` x `width` (e.g. curate's decoded size, maybe downscaled)."""

    top: int
    bottom: int
    left: int
    right: int
    height: int
    width: int

    def region(self, shown_h: int, shown_w: int, where) -> tuple[float, float, float, float]:
        """(top, bottom, left, right) of the content as fractions of the frame, after checking
        that the box's frame is the shown_h x shown_w one scaled (to within the 1-pixel
        rounding of each side): a box measured on another frame would crop the wrong part."""
        slack = 1.5 / self.height + 1.5 / self.width + 1.0 / shown_h + 1.0 / shown_w
        if abs((self.height * shown_w) / (self.width * shown_h) - 1.0) > slack:
            raise ContentBoxError(
                f"video {where}: its manifest box (bars {self.top}, {self.bottom}, {self.left}, "
                f"{self.right}) is given on a {self.height}x{self.width} frame (the line's "
                f"\"height\", \"width\"), but the video shows {shown_h}x{shown_w}, another "
                "aspect: the box must be measured on the whole frame as decoded")
        h, w = self.height, self.width
        return self.top / h, (h - self.bottom) / h, self.left / w, (w - self.right) / w


def crop_layout(height: int, width: int, target_h: int, target_w: int,
                region: tuple[float, float, float, float] | None = None
                ) -> tuple[tuple[int, int], int, int]:
    """((h, w), top, left): a height x width frame is scaled (aspect kept) to h x w so that its
    `region` (top, bottom, left, right as fractions of the frame; None = all of it) covers
    target_h x target_w, and the target_h x target_w crop at (top, left) is centred on the
    region (inside it, up to a pixel of rounding)."""
    if region is None:
        size = cover_size(height, width, target_h, target_w)
        return size, (size[0] - target_h) // 2, (size[1] - target_w) // 2
    y0, y1, x0, x1 = region
    scale = max(target_h / (height * (y1 - y0)), target_w / (width * (x1 - x0)))
    size = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    top = min(max(0, round((y0 + y1) * size[0] / 2 - target_h / 2)), size[0] - target_h)
    left = min(max(0, round((x0 + x1) * size[1] / 2 - target_w / 2)), size[1] - target_w)
    return size, top, left


class VideoReader:
    """An open video file: `num_frames`, `height`, `width` (as stored, before any display
    rotation), `fps` (average; 0.0 when the file gives none), `times`
    [num_frames] (seconds from the first frame; None when the file has no timestamps), `read`;
    `decoded` counts the frames decoded so far (what a seek saves)."""

    def __init__(self, path: str | Path, scan: tuple[int, np.ndarray | None] | None = None):
        """`scan`: this file's `reader.scan` from an earlier reader (the packet scan reads the
        whole file; a source that cuts many clips from one video keeps it)."""
        self.path = Path(path)
        self.decoded = 0
        if not self.path.is_file():
            raise VideoReadError(f"cannot read video {self.path}: file not found")
        self._container = self._open()
        try:
            stream = self._stream(self._container)
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
            self.height, self.width = stream.height, stream.width  # as stored (not rotated)
            self._pixel_aspect = pixel_aspect(stream)
            self._time_base = stream.time_base
            self._start_pts = stream.start_time or 0
            self.scan = scan or self._scan_packets()
            self.num_frames, self._pts = self.scan
            # frame number = rank of its timestamp: right for variable frame rates too, where
            # timestamp x average fps repeats and skips numbers
            self._rank = None if self._pts is None else {int(p): i for i, p in enumerate(self._pts)}
            self.times = (None if self._pts is None
                          else (self._pts - self._pts[0]).astype(np.float64) * float(self._time_base))
        except BaseException:
            self._container.close()
            raise
        if self.num_frames < 1:
            self.close()
            raise VideoReadError(f"cannot read video {self.path}: no decodable frames")

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def _open(self):
        try:
            return av.open(str(self.path))
        except AV_ERRORS as e:
            raise VideoReadError(f"cannot read video {self.path}: {e}") from e

    def _stream(self, container):
        stream = video_stream(container, self.path)
        stream.thread_type = "AUTO"
        return stream

    def _scan_packets(self) -> tuple[int, np.ndarray | None]:
        """(frame count, sorted presentation timestamps or None when some packet has none): one
        frame per video packet, from demuxing only (nothing is decoded; packets the decoder
        drops, e.g. an edit list's priming, are left out). Reopens the file afterwards,
        positioned at its start."""
        try:
            stamps = [p.pts for p in self._container.demux(self._stream(self._container))
                      if p.size and not p.is_discard]
        except AV_ERRORS as e:
            raise VideoReadError(f"cannot read video {self.path}: {e}") from e
        self._container.close()
        self._container = self._open()
        if not stamps or any(t is None for t in stamps) or len(set(stamps)) != len(stamps):
            return len(stamps), None
        return len(stamps), np.sort(np.asarray(stamps, np.int64))

    def _index(self, frame, fallback: int) -> int | None:
        """Frame number of a decoded frame: the rank of its timestamp among the packets' (None
        when it is not one of them); without timestamps, the decode count."""
        if self._rank is not None:
            return None if frame.pts is None else self._rank.get(int(frame.pts))
        if frame.pts is None or not self.fps:
            return fallback
        return round(float((frame.pts - self._start_pts) * self._time_base) * self.fps)

    def read(self, indices: Sequence[int], height: int, width: int,
             box: ContentBox | None = None) -> np.ndarray:
        """uint8 [len(indices), height, width, 3]: source frames `indices` (ascending, repeats
        allowed), each scaled to cover height x width and center-cropped as it is decoded.
        With a `box`, the content inside its bars is what is scaled to cover and cropped from:
        the bars never reach the clip (`ContentBoxError` when the box's frame has another
        aspect than the video)."""
        indices = [int(i) for i in indices]
        if not indices or indices != sorted(indices) or indices[0] < 0:
            raise ValueError(f"frame indices must be ascending and >= 0, got {indices[:8]}")
        if indices[-1] >= self.num_frames:
            raise VideoReadError(f"video {self.path} has {self.num_frames} frames; frame "
                                 f"{indices[-1]} was asked for")
        wanted = set(indices)
        try:
            if indices[0] == 0 and self.decoded:  # an earlier read moved past the start
                self._container.seek(0, stream=video_stream(self._container, self.path))
            got = self._decode(wanted, indices[0], height, width, box, seek=indices[0] > 0)
            if got is None:  # no timestamps or the seek overshot: count from the first frame
                self._container.seek(0, stream=video_stream(self._container, self.path))
                got = self._decode(wanted, indices[0], height, width, box, seek=False)
        except (VideoReadError, ContentBoxError):
            raise
        except AV_ERRORS as e:
            raise VideoReadError(f"cannot read video {self.path}: {e}") from e
        missing = sorted(wanted - set(got or {}))
        if missing:
            raise VideoReadError(f"video {self.path} ended before frame {missing[0]} (it "
                                 f"claims {self.num_frames} frames)")
        return np.stack([got[i] for i in indices])

    def _decode(self, wanted: set[int], first: int, height: int, width: int,
                box: ContentBox | None, seek: bool) -> dict[int, np.ndarray] | None:
        """{frame number: cropped frame} of the wanted frames, or None when this pass cannot
        number frames reliably (no timestamps after a seek, or the seek landed past `first`)."""
        stream = video_stream(self._container, self.path)
        if seek:
            if self._pts is not None:
                offset = int(self._pts[first])
            elif self.fps:
                offset = self._start_pts + int(first / self.fps / self._time_base)
            else:
                return None
            self._container.seek(offset, stream=stream, backward=True)
        got, last, layout = {}, max(wanted), None
        for count, frame in enumerate(self._container.decode(stream)):
            self.decoded += 1
            number = self._index(frame, count)
            if number is None:  # a timestamp no packet had: number by counting from the start
                if seek:
                    return None
                number = count
            if seek and count == 0 and number > first:
                return None
            if number in wanted and number not in got:
                turns = quarter_turns(frame)
                tall, wide = shown_size(frame.height, frame.width, self._pixel_aspect)
                shown = (wide, tall) if turns % 2 else (tall, wide)
                if layout is None:  # the upright frame's size, scaled so its content covers
                    region = None if box is None else box.region(*shown, self.path)
                    layout = crop_layout(*shown, height, width, region)
                size, top, left = layout
                shrink = size[0] * size[1] < tall * wide
                stored = size[::-1] if turns % 2 else size
                image = upright(frame.to_ndarray(height=stored[0], width=stored[1],
                                                 format="rgb24",
                                                 interpolation="AREA" if shrink else "BICUBIC"),
                                turns)
                got[number] = image[top:top + height, left:left + width]
            if number >= last:
                break
        return got
