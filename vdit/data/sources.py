"""Random-access data sources and the latent-shard record format.

- Latent shards (`vdit encode` writes them): ArrayRecord files, one msgpack record per clip with
  `latents [T', H', W', C]`, `text` (token ids [L] int32, or caption embeddings [L, D]), `caption`
  and a JSON `meta` string; optionally `cond_latents` / `cond_latents_last` [T', H', W', tf + z]
  (image-to-video and keyframe conditions, `vdit/data/conditions.py`) and `first_frame_clip_tokens`
  [N, image_dim] (the first frame's CLIP tokens, `vdit/data/image_tokens.py`). Grain reads them directly
  (`grain.sources.ArrayRecordDataSource`).
- `SkippingSource` wraps any source so that an unreadable record is skipped and counted
  (`skipped`, reported as the metric `data/skipped`) instead of crashing the run.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization

from vdit import runs
from vdit.data.image_tokens import RECORD_KEY as IMAGE_TOKENS_KEY

log = logging.getLogger(__name__)
SHARD_PATTERN = "latents-{index:05d}-of-{count:05d}.array_record"
REQUIRED_KEYS = ("latents", "text", "caption")
# float32 arrays kept when an example has them
OPTIONAL_ARRAYS = ("cond_latents", "cond_latents_last", IMAGE_TOKENS_KEY)


def encode_record(example: dict) -> bytes:
    """One clip -> bytes. `meta` (a dict) is stored as JSON so any metadata fits."""
    missing = [k for k in REQUIRED_KEYS if k not in example]
    if missing:
        raise ValueError(f"latent record is missing keys {missing}; has {sorted(example)}")
    record = {k: example[k] for k in REQUIRED_KEYS}
    record["latents"] = np.asarray(record["latents"], np.float32)
    record["text"] = np.asarray(record["text"])
    record |= {k: np.asarray(example[k], np.float32) for k in OPTIONAL_ARRAYS if k in example}
    record["meta"] = json.dumps(example.get("meta", {}))
    return serialization.msgpack_serialize(record)


def decode_record(data: bytes) -> dict:
    record = serialization.msgpack_restore(data)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"latent record is missing keys {missing}")
    if np.asarray(record["latents"]).ndim != 4:
        raise ValueError(f"latent record has latents of shape {np.shape(record['latents'])}, "
                         "expected [T', H', W', C]")
    record["meta"] = json.loads(record.get("meta") or "{}")
    return record


def write_records(path: str, examples: Iterable[dict], encode=None) -> int:
    """Writes `encode(example)` bytes to one ArrayRecord file atomically (tmp + rename): a crash
    never leaves a half-written file under the final name. Returns the count."""
    encode = encode_record if encode is None else encode
    final = runs.user_path(path)
    tmp = final.parent / (final.name + ".tmp")
    # ArrayRecord writes local files only: a remote shard is written locally, then uploaded.
    with runs.staged_output(tmp) as local:
        writer = ArrayRecordWriter(local, "group_size:1")
        count = 0
        try:
            for example in examples:
                writer.write(encode(example))
                count += 1
        finally:
            writer.close()
    tmp.replace(final)
    return count


def write_shard(path: str, examples: Iterable[dict]) -> int:
    """Latent records to one shard file; see `write_records`."""
    return write_records(path, examples, encode_record)


def shard_paths(folder: str) -> list[str]:
    """The finished latent shards of a folder, in order; an empty folder is an error."""
    paths = sorted(str(p) for p in runs.user_path(folder).glob("*.array_record"))
    if not paths:
        raise FileNotFoundError(f"no latent shards (*.array_record) in {folder!r}; "
                                "run `vdit encode` first")
    return paths


def local_shards(paths: Sequence[str]) -> list[str]:
    """Local filenames for ArrayRecord files: local paths as they are; remote ones (gs://...)
    copied once into a temporary folder removed at exit, since ArrayRecord's reader opens local
    files only. Each data-loading host copies every shard (a process reads records of all of
    them), unless `process_shards` gave it its own share; when they do not fit its disk,
    nothing is copied and the error says what to do."""
    if not any(runs.is_remote(p) for p in paths):
        return [str(p) for p in paths]
    _check_room([p for p in paths if runs.is_remote(p)], tempfile.gettempdir())
    cache = tempfile.mkdtemp(prefix="vdit-shards-")
    atexit.register(shutil.rmtree, cache, True)
    local = []
    for i, p in enumerate(paths):
        if not runs.is_remote(p):
            local.append(str(p))
            continue
        local.append(runs.download(p, f"{cache}/{i:05d}-{runs.user_path(p).name}"))
    return local


# A host's share may hold at most this much more data than the smallest share: every host packs
# the same rows a step, so a host with less data would repeat its clips more often.
SHARE_BALANCE = 1.1


def process_shards(paths: Sequence[str], process_index: int,
                   process_count: int) -> tuple[list[str], bool]:
    """(the shards this process reads, whether they are its own share). Remote shards are split
    between the processes, largest first to the lightest share, so each host copies about 1/N of
    the bytes instead of all (`local_shards`) and its pipeline reads all of its share; only when
    every share ends within `SHARE_BALANCE` of the smallest (equal sampling on every host; an
    empty shard from a small encode unbalances it). Otherwise, and for local shards, every
    process keeps them all and takes every N-th record of the globally shuffled set."""
    paths = [str(p) for p in paths]
    if process_count <= 1 or not any(runs.is_remote(p) for p in paths):
        return paths, False
    sizes = [runs.user_path(p).stat().length for p in paths]
    shares, load = [[] for _ in range(process_count)], [0] * process_count
    for i in sorted(range(len(paths)), key=lambda i: -sizes[i]):
        lightest = load.index(min(load))
        shares[lightest].append(i)
        load[lightest] += sizes[i]
    if min(load) > 0 and max(load) <= SHARE_BALANCE * min(load):
        return [paths[i] for i in sorted(shares[process_index])], True
    log.warning("%d remote latent shards do not split evenly over %d processes (shares of %.3g to "
                "%.3g GiB): every host copies all of them; encode more shards of equal size "
                "(config key 'encode.num_shards', at most the clip count) to give each host its "
                "own share", len(paths), process_count, min(load) / 2**30, max(load) / 2**30)
    return paths, False


def _check_room(remote: Sequence[str], local: str) -> None:
    """A host copies the remote shards it reads into the folder `local`: refuses before copying
    anything when they do not fit, naming the way out."""
    need = sum(runs.user_path(p).stat().length for p in remote)
    free = shutil.disk_usage(local).free
    log.info("copying %d remote shards (%.2f GiB) under %s", len(remote), need / 2**30, local)
    if need > 0.95 * free:
        raise OSError(
            f"{len(remote)} latent shards under {runs.user_path(remote[0]).parent} hold "
            f"{need / 2**30:.1f} GiB, and this host copies them to local disk (ArrayRecord "
            f"reads local files), but {local} has {free / 2**30:.1f} GiB free: mount the bucket "
            "(e.g. gcsfuse) and give its local path as data.latents_dir, or point TMPDIR at a "
            "larger disk")


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
    """Records of ArrayRecord files, decoded by `decode(bytes)`; random access across files."""

    def __init__(self, paths: Sequence[str], decode):
        self._paths = list(paths)
        self._decode = decode
        self._local = local_shards(self._paths)
        self._records = grain.sources.ArrayRecordDataSource(self._local)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._decode(self._records[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._paths)} files)"

    def first_records(self) -> list[tuple[str, dict | None]]:
        """(path as given, its first record decoded, or None for an empty file) per file: what
        a start-up check reads to name the shard that lacks something."""
        out = []
        for path, local in zip(self._paths, self._local, strict=True):
            records = grain.sources.ArrayRecordDataSource([local])
            out.append((path, self._decode(records[0]) if len(records) else None))
        return out


class LatentShardSource(ArrayRecordSource):
    """Clips from latent shards (a folder or a list of files), decoded."""

    def __init__(self, paths: str | os.PathLike | Sequence[str]):
        folder = isinstance(paths, (str, os.PathLike))  # a folder (local or gs://), else files
        super().__init__(shard_paths(paths) if folder else paths, decode_record)


class SkippingSource(grain.sources.RandomAccessDataSource):
    """Returns None (and counts it) where the wrapped source fails to produce a record, or where
    `check(record)` raises (a record the model cannot take, e.g. `pipeline.record_check`).

    `skipped` counts distinct bad records (each epoch and read-ahead reads them again), as read
    in this process: with `data.num_workers` > 0 the workers read, and each logs its skips."""

    def __init__(self, source, check=None):
        self._source, self._check = source, check
        self._bad: set[int] = set()

    @property
    def skipped(self) -> int:
        return len(self._bad)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        try:
            record = self._source[index]
            if self._check is not None:
                self._check(record)
            return record
        except Exception as e:  # noqa: BLE001 - any unreadable record is skipped, never fatal
            if index not in self._bad:
                self._bad.add(index)
                log.warning("data: skipping record %d of %r (%s: %s); skipped so far: %d",
                            index, self._source, type(e).__name__, e, self.skipped)
            return None

    @property
    def wrapped(self):
        """The source whose records this one passes on."""
        return self._source

    def __repr__(self) -> str:
        return f"SkippingSource({self._source!r})"
