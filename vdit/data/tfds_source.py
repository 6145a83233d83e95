"""TensorFlow Datasets as a pixel-clip source for `vdit encode` and as a sink for curated clips.

Source: `encode.source = "tfds:NAME[/CONFIG][:SPLIT]"` (split default "train") reads the prepared
dataset through `tfds.data_source` (ArrayRecord random access; no TensorFlow, nothing downloaded:
the dataset must already be prepared under `encode.tfds_data_dir`, default TFDS's own data dir).
Each example's video is the feature `encode.tfds_video_key` (default: "video", else "frames"),
uint8 [T, H, W, 3], and its caption the text feature `encode.tfds_caption_key` (default
"caption"; bytes or str). `TfdsClipSource` has `VideoClipSource`'s interface (`shape`, `clip`,
`entries`, `filtered`), so `vdit/data/encode_videos.py` encodes it the same way: a clip of the
drawn (frames, height, width) from the middle of the video, at `encode.fps` when the example has
an `fps` feature (the frames nearest each time, by the frames' own times when its `meta` has
`times`; else consecutive frames), scaled to cover and center-cropped.

Sink: `write_tfds_clips` turns `vdit curate`'s clip shards into a TFDS dataset folder (ArrayRecord
files + dataset_info.json/features.json), which `tfds.builder_from_directory` opens with TFDS's
splits, metadata and catalog tooling, and which `encode.source="tfds:NAME"` (with
`encode.tfds_data_dir`) reads back. Features: `frames` (uint8 [T, H, W, 3], zlib), `caption`,
`recaption`, `meta` (JSON text) and `fps` (float32; the clip's average rate: a variable-rate
clip's meta also holds `times`, each frame's seconds from its first, and the reader samples by
them). Writing and reading need no TensorFlow (TFDS's `Video` feature would: it encodes frames
through TensorFlow, hence plain tensors here).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from vdit.data import video_io
from vdit.data.encode import sample_shape
from vdit.data.video_files import VideoEntry, clip_indices

PREFIX = "tfds:"
VIDEO_KEYS = ("video", "frames")  # tried in order when encode.tfds_video_key is empty
VERSION = "1.0.0"


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    name: str    # NAME or NAME/CONFIG, as tfds.data_source takes it
    split: str

    def __str__(self) -> str:
        return f"{PREFIX}{self.name}:{self.split}"


def is_tfds(source: str) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_spec(source: str) -> TfdsSpec:
    """"tfds:NAME[/CONFIG][:SPLIT]" -> TfdsSpec; a malformed one is an error naming the key."""
    body = source[len(PREFIX):] if is_tfds(source) else ""
    name, _, split = body.partition(":")
    parts = name.split("/")
    if not name or len(parts) > 2 or not all(parts) or ":" in split:
        raise ValueError(f"config key 'encode.source' = {source!r}: expected "
                         "'tfds:NAME[/CONFIG][:SPLIT]', e.g. 'tfds:my_videos:train'")
    return TfdsSpec(name, split or "train")


def clip_features() -> tfds.features.FeaturesDict:
    """The features of a curated-clip TFDS dataset (see the module docstring)."""
    return tfds.features.FeaturesDict({
        "frames": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib"),
        "caption": tfds.features.Text(), "recaption": tfds.features.Text(),
        "meta": tfds.features.Text(), "fps": tfds.features.Scalar(dtype=np.float32)})


def write_tfds_clips(clips: Sequence[dict] | Sequence[Sequence[dict]], out_dir: str,
                     name: str = "vdit_clips", split: str = "train") -> epath.Path:
    """Writes curated clips (records of `vdit.curate.records`: frames, caption, recaption, fps,
    meta) as TFDS dataset `name` under `out_dir` (one ArrayRecord file per group of `clips` when
    given a list of groups, e.g. one per clip shard). Returns the dataset folder
    `out_dir/name/1.0.0`, which `tfds.builder_from_directory` opens."""
    groups = [clips] if clips and isinstance(clips[0], dict) else list(clips)
    if not groups or not any(groups):
        raise ValueError(f"no clips to write as TFDS dataset {name!r}")
    folder = epath.Path(out_dir) / name / VERSION
    folder.mkdir(parents=True, exist_ok=True)
    features = clip_features()
    lengths = []
    for i, group in enumerate(groups):
        path = folder / f"{name}-{split}.array_record-{i:05d}-of-{len(groups):05d}"
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for clip in group:
            writer.write(features.serialize_example({
                "frames": np.asarray(clip["frames"], np.uint8), "caption": clip.get("caption", ""),
                "recaption": clip.get("recaption", ""), "fps": float(clip.get("fps", 0.0)),
                "meta": json.dumps(clip.get("meta", {}))}))
        writer.close()
        lengths.append(len(group))
    # check_data=False: TFDS's check reads through tf.data (TensorFlow); our reader is numpy.
    tfds.folder_dataset.write_metadata(
        data_dir=folder, features=features, check_data=False,
        split_infos=[tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=0)],
        description="Video clips curated by `vdit curate` (vdit/data/tfds_source.py).")
    return folder


class _Entries(Sequence):
    """Entry i of a TFDS source as a `VideoEntry` named "tfds:NAME:SPLIT[i]" (for skip reports)."""

    def __init__(self, spec: TfdsSpec, count: int):
        self._spec, self._count = spec, count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> VideoEntry:
        if not 0 <= index < self._count:
            raise IndexError(index)
        key = f"{self._spec}[{index}]"
        return VideoEntry(file=key, caption="", key=key)


class TfdsClipSource(grain.sources.RandomAccessDataSource):
    """Example i of a TFDS data source -> {"video": float32 [T, H, W, 3] in [-1, 1], "caption",
    "meta"} at `shape(i)`, like `VideoClipSource`."""

    def __init__(self, data, spec: TfdsSpec, shapes, shape_weights=None, seed: int = 0,
                 fps: float = 0.0, video_key: str = "", caption_key: str = "caption"):
        if not shapes:
            raise ValueError("config key 'encode.shapes' is empty: give (frames, height, width)s")
        self._data, self.spec = data, spec
        self._shapes, self._weights, self._seed, self._fps = shapes, shape_weights, seed, fps
        names = _feature_names(data)
        if video_key:
            candidates = (video_key,)
        else:
            candidates = VIDEO_KEYS
        found = [k for k in candidates if names is None or k in names]
        if not found:
            raise ValueError(f"config key 'encode.tfds_video_key' = {video_key!r}: {spec} has no "
                             f"feature {' or '.join(map(repr, candidates))}; features: {sorted(names)}")
        if names is not None and caption_key not in names:
            raise ValueError(f"config key 'encode.tfds_caption_key' = {caption_key!r}: {spec} has "
                             f"no such feature; features: {sorted(names)}")
        self.video_key, self.caption_key = found[0], caption_key
        self.entries = _Entries(spec, len(data))
        self.filtered = 0

    @classmethod
    def from_config(cls, cfg) -> TfdsClipSource:
        """From `config.encode`: source, tfds_data_dir, tfds_video_key, tfds_caption_key, shapes,
        shape_weights, seed, fps."""
        spec = parse_spec(cfg.source)
        data_dir = cfg.get("tfds_data_dir", "") or None
        try:
            data = tfds.data_source(spec.name, split=spec.split, data_dir=data_dir, download=False)
        except Exception as e:  # TFDS raises several types (not found, not prepared, bad split)
            raise ValueError(f"config key 'encode.source' = {cfg.source!r}: cannot open TFDS "
                             f"dataset {spec.name!r} split {spec.split!r} (data dir "
                             f"{data_dir or 'TFDS default'}): {type(e).__name__}: {e}") from e
        return cls(data, spec, cfg.shapes, cfg.shape_weights, cfg.seed, float(cfg.get("fps", 0.0)),
                   cfg.get("tfds_video_key", ""), cfg.get("tfds_caption_key", "caption") or "caption")

    def __len__(self) -> int:
        return len(self._data)

    def shape(self, index: int) -> tuple[int, int, int]:
        """(frames, height, width) of clip `index`: a pure function of (seed, index)."""
        return sample_shape(index, self._shapes, self._weights, self._seed)

    def __getitem__(self, index: int) -> dict:
        return self.clip(index, self.shape(index))

    def clip(self, index: int, shape: tuple[int, int, int]) -> dict:
        example = self._data[index]
        frames, height, width = shape
        video = np.asarray(example[self.video_key])
        where = f"{self.spec}[{index}] feature {self.video_key!r}"
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"{where} has shape {video.shape}, expected uint8 [T, H, W, 3]")
        source_fps = float(np.asarray(example.get("fps", 0.0)))
        meta = _meta(example.get("meta"))
        # A variable-rate clip's frame times (curate's `times`; older records have none and are
        # sampled at their average rate). Dropped from the clip's meta: they time the source.
        times = _times(meta.pop("times", None), len(video), where)
        idx = clip_indices(len(video), source_fps, frames, self._fps, where, times)
        clip = video_io.resize_and_crop(video[idx].astype(np.uint8), height, width)
        meta |= {"index": index, "file": f"{self.spec}[{index}]", "source_frames": len(video),
                 "source_fps": source_fps, "fps": self._fps if self._fps > 0 else source_fps,
                 "first_frame": int(idx[0])}
        return {"video": video_io.to_float(clip), "caption": _text(example[self.caption_key]),
                "meta": meta}

    def __repr__(self) -> str:
        return f"TfdsClipSource({self.spec}, {len(self)} examples)"


def _feature_names(data) -> set | None:
    info = getattr(data, "dataset_info", None)
    features = getattr(info, "features", None)
    return set(features.keys()) if features is not None else None


def _text(value) -> str:
    if isinstance(value, bytes | np.bytes_):
        return value.decode("utf-8").strip()
    return str(value).strip()


def _times(value, num_frames: int, where: str) -> np.ndarray | None:
    """A clip's per-frame times (seconds from its first frame) from its meta, or None when it
    has none; a list that does not time its frames one by one is an error."""
    if value is None:
        return None
    times = np.asarray(value, np.float64)
    if times.shape != (num_frames,) or np.any(np.diff(times) <= 0):
        raise ValueError(f"{where}: meta 'times' must be {num_frames} increasing frame times "
                         f"(seconds), got shape {times.shape}")
    return times


def _meta(value) -> dict:
    if value is None:
        return {}
    try:
        meta = json.loads(_text(value) or "{}")
    except json.JSONDecodeError:
        return {"tfds_meta": _text(value)}
    return meta if isinstance(meta, dict) else {"tfds_meta": meta}
