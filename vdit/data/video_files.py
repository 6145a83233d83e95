"""Random-access source over video files: a folder of videos or a jsonl manifest -> pixel clips.

Entries:
- a folder: every file under it (recursively, sorted) whose suffix is in `extensions`; the caption
  is the stripped text of a sidecar `<name>.txt` next to the video, or the empty caption when there
  is none (an empty caption trains the unconditional branch, like caption dropout);
- a `.jsonl` manifest: one object per line with the video in `file`, `path` or `source` (the first
  present; absolute, or relative to `encode.video_root`, default the manifest's folder) and
  its caption in `encode.caption_key` (default `caption`: optional, default empty; any other
  key must be on every line); every other key (fps, motion, scores, ...) is kept as
  metadata and lands in the record's `meta`. `vdit curate`'s clips.jsonl is such a manifest: a
  line names its video in `source` (relative to curate's input folder: set `encode.video_root`
  to it) and its clip as source frames [`start_frame`, `end_frame`), which restrict the clip to
  that range; lines with `kept` false (clips curate dropped, videos it could not read) are
  skipped and counted as filtered, not as errors. Curate's `caption` (the source's, from a
  manifest or sidecar) is the caption by default; `encode.caption_key="recaption"` takes its
  captioner's instead. Its `box` (black bars: top, bottom, left, right, in pixels of the line's
  upright `height` x `width`) is cropped away before the resize, as curate crops its own clip
  shards. Its `motion` (frame short sides per second) reaches the record's meta for
  micro-conditioning.

`source[i]` decodes entry i into the clip shape `shape(i)`, drawn by `encode.sample_shape` from
(shapes, weights, seed): `frames` frames taken from the middle of the video or its frame range (at
`fps` frames per second when fps > 0, else consecutive source frames; one middle frame for T = 1
images), scaled to cover height x width (a manifest box's content, when it has one) and
center-cropped. Only those frames are decoded, resized while decoding, after a seek near the first
(`clip_decode.VideoReader`): memory does not grow with the video's length or native resolution. A
missing or corrupt file raises `VideoReadError`, a video or range with too few frames
`ClipTooShortError`, a range past the video's end `FrameRangeError`, a box measured on a frame of
another aspect than the video's `clip_decode.ContentBoxError`; callers skip and count them all
(see `vdit/data/encode_videos.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np

from vdit.data import video_io
from vdit.data.clip_decode import ContentBox, VideoReader
from vdit.data.encode import sample_shape

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")


NAME_KEYS = ("file", "path", "source")  # manifest keys naming the video, in order of precedence
SCANS_KEPT = 256  # videos whose packet scans a VideoClipSource keeps


class ClipTooShortError(ValueError):
    """A readable video holds fewer frames than the clip shape drawn for it."""


class FrameRangeError(ValueError):
    """A manifest's frame range reaches past the end of its video."""


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    file: str  # absolute path of the video
    caption: str
    key: str  # the name it goes by in records: path relative to the folder, or as in the manifest
    meta: dict = dataclasses.field(default_factory=dict)  # manifest keys other than file/caption
    frames: tuple[int, int] | None = None  # source frames [start, end) of the clip; None = all
    crop: ContentBox | None = None  # black bars cropped before the resize; None = none
    error: str = ""  # why the entry cannot be used (e.g. an unreadable caption); loading raises it


def list_folder(folder: str | Path, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[VideoEntry]:
    """Videos under `folder` (sorted), captioned from `<name>.txt` sidecars or empty. A link to
    a missing file is an entry with an error (skipped and counted, not silently left out)."""
    folder = Path(folder)
    entries = []
    for path in video_io.find_videos(folder, extensions):
        if not path.exists():
            entries.append(VideoEntry(str(path.absolute()), "", path.relative_to(folder).as_posix(),
                                      error=f"{path} is a link to a missing file"))
            continue
        sidecar = path.with_suffix(".txt")
        caption, error = "", ""
        try:
            caption = video_io.read_text(sidecar).strip() if sidecar.is_file() else ""
        except (OSError, UnicodeDecodeError) as e:  # that video is skipped and counted, not fatal
            error = f"caption file {sidecar}: {type(e).__name__}: {e}"
        entries.append(VideoEntry(str(path.resolve()), caption, path.relative_to(folder).as_posix(),
                                  error=error))
    return entries


def read_manifest(path: str | Path, root: str | Path = "",
                  caption_key: str = "caption") -> tuple[list[VideoEntry], int]:
    """(entries of a jsonl manifest in file order, number of lines skipped as `kept` false);
    relative video paths resolve against `root` (default: the manifest's folder); the caption is
    each line's `caption_key`. A malformed line is an error naming it."""
    path = Path(path)
    root = Path(root) if root else path.parent
    entries, filtered = [], 0
    for number, line, text in video_io.manifest_lines(path):
        entry = _manifest_entry(line, root, f"manifest {path} line {number}", text, caption_key)
        if entry is None:
            filtered += 1
        else:
            entries.append(entry)
    return entries, filtered


def _manifest_entry(line, root: Path, where: str, text: str,
                    caption_key: str = "caption") -> VideoEntry | None:
    """One manifest line -> its entry, or None when the line says `kept` false."""
    name_key = next((k for k in NAME_KEYS if isinstance(line, dict) and k in line), None)
    name = line[name_key] if name_key else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: expected an object with a \"file\" (or \"path\", "
                         f"\"source\") string and optional \"caption\", got {text[:80]!r}")
    kept = line.get("kept", True)
    if not isinstance(kept, bool):
        raise ValueError(f"{where}: \"kept\" = {kept!r}; expected true or false")
    if not kept:
        return None
    file = Path(name) if Path(name).is_absolute() else root / name
    # curate's per-frame `times` time the source, not the clip encode draws (and can be thousands
    # of numbers): not copied into every latent record
    meta = {k: v for k, v in line.items()
            if k not in ("file", "path", name_key, caption_key, "times")}
    return VideoEntry(str(file.resolve()), caption_of(line, where, caption_key), name, meta,
                      _frame_range(line, where), _crop_region(line, where))


def caption_of(line: dict, where: str, key: str = "caption") -> str:
    """A manifest line's caption, its `key` (config key 'encode.caption_key'): text, or "" when
    null, or absent for the default "caption"; another key (e.g. curate's "recaption") must be
    present, as a line without it was not captioned the way the config asks. Any other type (a
    list, an object, a number) is an error naming the line rather than a caption made of its
    repr."""
    if key not in line and key != "caption":
        raise ValueError(f"{where}: no \"{key}\" (config key 'encode.caption_key' = {key!r}); "
                         "give every line that key, or set encode.caption_key to the key that "
                         "holds the captions (default \"caption\")")
    caption = line.get(key)
    if caption is None:
        return ""
    if not isinstance(caption, str):
        raise ValueError(f"{where}: \"{key}\" = {caption!r:.80}; expected a string (or null)")
    return caption


def _crop_region(line: dict, where: str) -> ContentBox | None:
    """curate's `box` (top, bottom, left, right bars in pixels of the line's `height` x `width`,
    the upright frame as curate decoded it, maybe downscaled), or None when the line has no box
    or no bars."""
    box = line.get("box")
    if box is None:
        return None
    height, width = line.get("height"), line.get("width")
    ints = all(isinstance(v, int) and not isinstance(v, bool)
               for v in (*(box if isinstance(box, list) else [None]), height, width))
    if not (ints and len(box) == 4 and min(box) >= 0 and height > 0 and width > 0
            and box[0] + box[1] < height and box[2] + box[3] < width):
        raise ValueError(f"{where}: \"box\" = {box!r:.80} with \"height\" = {height!r}, "
                         f"\"width\" = {width!r}; expected [top, bottom, left, right] bars in "
                         "pixels of a height x width frame (as `vdit curate` writes them) that "
                         "leave some of it")
    return ContentBox(*box, height, width) if any(box) else None


def _frame_range(line: dict, where: str) -> tuple[int, int] | None:
    """curate's [start_frame, end_frame) of a line, or None when it has neither key."""
    if "start_frame" not in line and "end_frame" not in line:
        return None
    start, end = line.get("start_frame"), line.get("end_frame")
    if not (all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
            and 0 <= start < end):
        raise ValueError(f"{where}: \"start_frame\" = {start!r}, \"end_frame\" = {end!r}; "
                         "expected integers 0 <= start_frame < end_frame (source frames "
                         "[start, end) of the clip)")
    return start, end


def list_source(source: str | Path, extensions: Sequence[str] = VIDEO_EXTENSIONS,
                root: str | Path = "", caption_key: str = "caption") -> tuple[list[VideoEntry], int]:
    """A folder or a .jsonl manifest (relative paths against `root`, default its folder;
    captions from each line's `caption_key`) -> (its entries, manifest lines filtered as not
    kept); anything else, nothing to encode, a manifest none of whose videos exists, or (for a
    caption key other than "caption") one none of whose captions has text is an error naming
    it."""
    path = Path(source)
    filtered = 0
    if path.is_dir():
        entries = list_folder(path, extensions)
    elif path.is_file() and path.suffix == ".jsonl":
        entries, filtered = read_manifest(path, root, caption_key)
        if entries and caption_key != "caption" and not any(e.caption for e in entries):
            raise ValueError(
                f"config key 'encode.caption_key' = {caption_key!r}: every kept line of manifest "
                f"{path} has an empty {caption_key!r} (`vdit curate` writes \"recaption\" only "
                "with curate.captions.captioner set): encoding would train on no captions")
        if entries and not any(Path(e.file).is_file() for e in entries):
            raise FileNotFoundError(
                f"none of the videos in manifest {path} exists (the first resolves to "
                f"{entries[0].file}); relative paths resolve against config key "
                f"'encode.video_root' = {str(root)!r} (empty: the manifest's folder); for "
                "`vdit curate`'s clips.jsonl set it to curate's input folder")
    else:
        raise FileNotFoundError(f"config key 'encode.source' = {str(source)!r}: expected "
                                "\"synthetic\", a folder of videos or a .jsonl manifest")
    if not entries:
        why = (f"({filtered} lines have \"kept\" false)" if filtered
               else f"(looked for suffixes {list(extensions)})")
        raise FileNotFoundError(f"config key 'encode.source' = {str(source)!r} lists no videos "
                                f"{why}")
    return entries, filtered


def clip_indices(num_source: int, source_fps: float, frames: int, target_fps: float,
                 where: str = "video", times: np.ndarray | None = None) -> np.ndarray:
    """Indices [frames] of a window in the middle of a num_source-frame video: every source frame
    (target_fps <= 0 or unknown source fps) or resampled to target_fps: the frame nearest each
    time, from source_fps, or from the frames' own `times` (seconds, [num_source]) when given and
    off the constant-rate grid by more than a quarter frame (a variable frame rate; a container's
    millisecond rounding stays on the grid). Too short: ClipTooShortError."""
    if target_fps > 0 and times is not None and len(times) == num_source:
        times = np.asarray(times, np.float64) - times[0]
        grid = np.arange(num_source) / source_fps if source_fps > 0 else None
        if grid is None or np.abs(times - grid).max() > 0.25 / source_fps:
            return _nearest_frames(times, frames, target_fps, where)
    if target_fps <= 0 or source_fps <= 0:
        if num_source < frames:
            raise ClipTooShortError(f"{where} has {num_source} frames; the clip needs {frames}")
        return (num_source - frames) // 2 + np.arange(frames)
    latest = video_io.max_start_time(num_source, source_fps, frames, target_fps)
    if latest < 0:
        raise ClipTooShortError(f"{where} has {num_source} frames at {source_fps:g} fps; the clip "
                                f"needs {frames} frames at {target_fps:g} fps")
    return video_io.sample_indices(num_source, source_fps, frames, target_fps, latest / 2)


def _nearest_frames(times: np.ndarray, frames: int, target_fps: float, where: str) -> np.ndarray:
    """The frame nearest each of `frames` times 1/target_fps apart, in the middle of `times`
    (ties go to the later frame, as video_io.sample_indices rounds)."""
    span = (frames - 1) / target_fps
    latest = times[-1] - span
    if latest < -1e-9:
        raise ClipTooShortError(f"{where} lasts {times[-1]:.3f} s ({len(times)} frames); the "
                                f"clip needs {frames} frames at {target_fps:g} fps ({span:.3f} s)")
    wanted = max(0.0, latest) / 2 + np.arange(frames) / target_fps
    after = np.clip(np.searchsorted(times, wanted), 1, len(times) - 1)
    later = times[after] - wanted <= wanted - times[after - 1] + 1e-9
    return np.where(later, after, after - 1) if len(times) > 1 else np.zeros(frames, np.int64)


class VideoClipSource(grain.sources.RandomAccessDataSource):
    """Entry i -> {"video": float32 [T, H, W, 3] in [-1, 1], "caption", "meta"} at `shape(i)`."""

    def __init__(self, entries: Sequence[VideoEntry], shapes, shape_weights=None, seed: int = 0,
                 fps: float = 0.0, filtered: int = 0):
        if not shapes:
            raise ValueError("config key 'encode.shapes' is empty: give (frames, height, width)s")
        self.entries = list(entries)
        self.filtered = filtered  # manifest lines skipped as `kept` false
        self._shapes, self._weights, self._seed, self._fps = shapes, shape_weights, seed, fps
        # Each video's packet scan (frame count, timestamps): it reads the whole file, and a
        # curated manifest cuts many clips from one long video. Bounded; (file, mtime, size) keys.
        self._scans: dict[tuple, tuple] = {}

    @classmethod
    def from_config(cls, cfg) -> VideoClipSource:
        """From `config.encode`: source, shapes, shape_weights, seed, fps, extensions,
        video_root, caption_key (the last three optional)."""
        entries, filtered = list_source(cfg.source, cfg.get("extensions", None) or VIDEO_EXTENSIONS,
                                        cfg.get("video_root", None) or "",
                                        cfg.get("caption_key", None) or "caption")
        return cls(entries, cfg.shapes, cfg.shape_weights, cfg.seed, float(cfg.get("fps", 0.0)),
                   filtered)

    def _remember(self, key: tuple, scan: tuple) -> None:
        if key not in self._scans and len(self._scans) >= SCANS_KEPT:
            self._scans.pop(next(iter(self._scans)), None)  # the oldest
        self._scans[key] = scan

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, index: int) -> tuple[int, int, int]:
        """(frames, height, width) of clip `index`: a pure function of (seed, index)."""
        return sample_shape(index, self._shapes, self._weights, self._seed)

    def __getitem__(self, index: int) -> dict:
        return self.clip(index, self.shape(index))

    def clip(self, index: int, shape: tuple[int, int, int]) -> dict:
        """Entry `index` decoded at an explicit (frames, height, width). Meta `source_frames`
        counts the frames the clip is drawn from (the entry's range, or the whole video);
        `first_frame` is the clip's first frame in the whole video."""
        entry = self.entries[index]
        if entry.error:
            raise ValueError(entry.error)
        frames, height, width = shape
        file = Path(entry.file)
        stat = file.stat() if file.is_file() else None
        key = (entry.file,) + ((stat.st_mtime_ns, stat.st_size) if stat else ())
        with VideoReader(entry.file, self._scans.get(key)) as reader:
            self._remember(key, reader.scan)
            start, end = entry.frames or (0, reader.num_frames)
            if end > reader.num_frames:
                raise FrameRangeError(f"video {entry.file} has {reader.num_frames} frames; its "
                                      f"manifest line asks for frames [{start}, {end})")
            where = f"video {entry.file}" + (f" frames [{start}, {end})" if entry.frames else "")
            times = None if reader.times is None else reader.times[start:end]
            idx = clip_indices(end - start, reader.fps, frames, self._fps, where, times)
            clip = reader.read(start + idx, height, width, entry.crop)
        meta = {**entry.meta, "index": index, "file": entry.key, "source_frames": end - start,
                "source_fps": reader.fps, "fps": self._fps if self._fps > 0 else reader.fps,
                "first_frame": start + int(idx[0])}
        return {"video": video_io.to_float(clip), "caption": entry.caption, "meta": meta}

    def __repr__(self) -> str:
        return f"VideoClipSource({len(self.entries)} videos)"
