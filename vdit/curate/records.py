"""Clip shards: the ArrayRecord files `vdit curate` writes, one msgpack record per kept clip.

A record holds `frames` uint8 [T, H, W, 3], `caption` (the original, from the manifest or a
sidecar file; "" when none), `recaption` (from the captioning model; "" when none ran), `fps`
(the clip's average rate) and a JSON `meta` string (the clip's line of clips.jsonl: source, frame
range, every score, and for a variable-rate clip `times`: each frame's seconds from its first,
which readers sample by instead of `fps`; records written before curate stored them have none).
`grain.sources.ArrayRecordDataSource` reads the files (raw bytes -> `decode_clip`), or
`ClipShardSource` does both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
from flax import serialization

from vdit import runs
from vdit.data.sources import ArrayRecordSource, write_records

PART_PATTERN = "clips-{shard:05d}-of-{num_shards:05d}-part-{part:05d}.array_record"
PART_GLOB = "clips-{shard:05d}-of-{num_shards:05d}-part-*.array_record"
REQUIRED_KEYS = ("frames", "caption", "recaption", "fps")


def encode_clip(example: dict) -> bytes:
    """One clip -> bytes; `meta` (a dict) is stored as JSON."""
    missing = [k for k in REQUIRED_KEYS if k not in example]
    if missing:
        raise ValueError(f"clip record is missing keys {missing}; has {sorted(example)}")
    frames = np.asarray(example["frames"])
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"clip record frames must be uint8 [T, H, W, 3], got "
                         f"{frames.dtype} {frames.shape}")
    record = {"frames": frames, "caption": str(example["caption"]),
              "recaption": str(example["recaption"]), "fps": float(example["fps"]),
              "meta": json.dumps(example.get("meta", {}))}
    return serialization.msgpack_serialize(record)


def decode_clip(data: bytes) -> dict:
    record = serialization.msgpack_restore(data)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"clip record is missing keys {missing}")
    record["meta"] = json.loads(record.get("meta") or "{}")
    return record


def write_clip_file(path: str, examples: Iterable[dict]) -> int:
    """Writes clips to one ArrayRecord file atomically (tmp + rename); returns the count."""
    return write_records(path, examples, encode_clip)


def part_path(output: str, shard: int, num_shards: int, part: int) -> str:
    return str(runs.user_path(output) / PART_PATTERN.format(shard=shard, num_shards=num_shards,
                                                            part=part))


def worker_parts(output: str, shard: int, num_shards: int) -> list[str]:
    """This worker's finished part files, in order."""
    pattern = PART_GLOB.format(shard=shard, num_shards=num_shards)
    return sorted(str(p) for p in runs.user_path(output).glob(pattern))


def clip_paths(folder: str) -> list[str]:
    """All clip shards of a curate output folder, in order; none is an error."""
    paths = sorted(str(p) for p in runs.user_path(folder).glob("clips-*-part-*.array_record"))
    if not paths:
        raise FileNotFoundError(f"no clip shards (clips-*-part-*.array_record) in {folder!r}; "
                                "run `vdit curate` first")
    return paths


class ClipShardSource(ArrayRecordSource):
    """Curated clips, decoded; random access across all files of a folder (or a path list)."""

    def __init__(self, paths: str | Sequence[str]):
        super().__init__(clip_paths(paths) if isinstance(paths, str) else paths, decode_clip)
