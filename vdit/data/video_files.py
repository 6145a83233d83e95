"""Random-access source over video files: a folder of videos or a jsonl manifest -> pixel clips.

Entries:
- a folder: every file under it (recursively, sorted) whose suffix is in `extensions`; the caption
  is the stripped text of a sidecar `<name>.txt` next to the video, or the empty caption when there
  is none (an empty caption trains the unconditional branch, like caption dropout);
- a `.jsonl` manifest: one object per line with `file` (or `path`, curate's name; relative to the
  manifest's folder, or absolute) and `caption` (optional, default empty); every other key (fps,
  motion, scores, ...) is kept as metadata and lands in the record's `meta`.

`source[i]` decodes entry i (PyAV, `video_io`) into the clip shape `shape(i)`, drawn by
`encode.sample_shape` from (shapes, weights, seed): `frames` frames taken from the middle of the
video (at `fps` frames per second when fps > 0, else consecutive source frames; one middle frame
for T = 1 images), then scaled to cover height x width and center-cropped. A missing or corrupt
file raises `VideoReadError`, a video with too few frames `ClipTooShortError`; callers skip and
count both (see `vdit/data/encode_videos.py`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np

from vdit.data import video_io
from vdit.data.encode import sample_shape

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")


class ClipTooShortError(ValueError):
    """A readable video holds fewer frames than the clip shape drawn for it."""


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    file: str  # absolute path of the video
    caption: str
    key: str  # the name it goes by in records: path relative to the folder, or as in the manifest
    meta: dict = dataclasses.field(default_factory=dict)  # manifest keys other than file/caption


def list_folder(folder: str | Path, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[VideoEntry]:
    """Videos under `folder` (sorted), captioned from `<name>.txt` sidecars or empty."""
    folder = Path(folder)
    exts = {e.lower() for e in extensions}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    entries = []
    for path in files:
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text().strip() if sidecar.is_file() else ""
        entries.append(VideoEntry(str(path.resolve()), caption, path.relative_to(folder).as_posix()))
    return entries


def read_manifest(path: str | Path) -> list[VideoEntry]:
    """Entries of a jsonl manifest in file order; a malformed line is an error naming it."""
    path = Path(path)
    entries = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {path} line {number} is not JSON: {e}") from e
        name = line.get("file", line.get("path")) if isinstance(line, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"manifest {path} line {number}: expected an object with a \"file\" "
                             f"string (and optional \"caption\"), got {text[:80]!r}")
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        meta = {k: v for k, v in line.items() if k not in ("file", "path", "caption")}
        entries.append(VideoEntry(str(file.resolve()), str(line.get("caption") or ""), name, meta))
    return entries


def list_videos(source: str | Path, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[VideoEntry]:
    """A folder or a .jsonl manifest -> its entries; anything else is an error naming it."""
    path = Path(source)
    if path.is_dir():
        entries = list_folder(path, extensions)
    elif path.is_file() and path.suffix == ".jsonl":
        entries = read_manifest(path)
    else:
        raise FileNotFoundError(f"config key 'encode.source' = {str(source)!r}: expected "
                                "\"synthetic\", a folder of videos or a .jsonl manifest")
    if not entries:
        raise FileNotFoundError(f"config key 'encode.source' = {str(source)!r} lists no videos "
                                f"(looked for suffixes {list(extensions)})")
    return entries


def clip_indices(num_source: int, source_fps: float, frames: int, target_fps: float,
                 where: str = "video") -> np.ndarray:
    """Indices [frames] of a window in the middle of a num_source-frame video: every source frame
    (target_fps <= 0 or unknown source fps) or resampled to target_fps. Too short: ClipTooShortError."""
    if target_fps <= 0 or source_fps <= 0:
        if num_source < frames:
            raise ClipTooShortError(f"{where} has {num_source} frames; the clip needs {frames}")
        return (num_source - frames) // 2 + np.arange(frames)
    latest = video_io.max_start_time(num_source, source_fps, frames, target_fps)
    if latest < 0:
        raise ClipTooShortError(f"{where} has {num_source} frames at {source_fps:g} fps; the clip "
                                f"needs {frames} frames at {target_fps:g} fps")
    return video_io.sample_indices(num_source, source_fps, frames, target_fps, latest / 2)


class VideoClipSource(grain.sources.RandomAccessDataSource):
    """Entry i -> {"video": float32 [T, H, W, 3] in [-1, 1], "caption", "meta"} at `shape(i)`."""

    def __init__(self, entries: Sequence[VideoEntry], shapes, shape_weights=None, seed: int = 0,
                 fps: float = 0.0):
        if not shapes:
            raise ValueError("config key 'encode.shapes' is empty: give (frames, height, width)s")
        self.entries = list(entries)
        self._shapes, self._weights, self._seed, self._fps = shapes, shape_weights, seed, fps

    @classmethod
    def from_config(cls, cfg) -> VideoClipSource:
        """From `config.encode`: source, shapes, shape_weights, seed, fps, extensions."""
        entries = list_videos(cfg.source, cfg.get("extensions", None) or VIDEO_EXTENSIONS)
        return cls(entries, cfg.shapes, cfg.shape_weights, cfg.seed, float(cfg.get("fps", 0.0)))

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, index: int) -> tuple[int, int, int]:
        """(frames, height, width) of clip `index`: a pure function of (seed, index)."""
        return sample_shape(index, self._shapes, self._weights, self._seed)

    def __getitem__(self, index: int) -> dict:
        return self.clip(index, self.shape(index))

    def clip(self, index: int, shape: tuple[int, int, int]) -> dict:
        """Entry `index` decoded at an explicit (frames, height, width)."""
        entry = self.entries[index]
        frames, height, width = shape
        video, source_fps = video_io.load_video(entry.file)
        idx = clip_indices(len(video), source_fps, frames, self._fps, f"video {entry.file}")
        clip = video_io.resize_and_crop(video[idx], height, width)
        meta = {**entry.meta, "index": index, "file": entry.key, "source_frames": len(video),
                "source_fps": source_fps, "fps": self._fps if self._fps > 0 else source_fps,
                "first_frame": int(idx[0])}
        return {"video": video_io.to_float(clip), "caption": entry.caption, "meta": meta}

    def __repr__(self) -> str:
        return f"VideoClipSource({len(self.entries)} videos)"
