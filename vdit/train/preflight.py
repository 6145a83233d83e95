"""Checks a training run makes before it builds models: the data has clips, the mesh divides the
batch, and the workdir is a folder. Each failure is a ValueError naming the input and the fix."""

from __future__ import annotations

from jax.sharding import Mesh

from vdit import runs
from vdit.data.pipeline import BATCH_AXES


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
    """A run folder: absent (created later) or a folder, never a file."""
    path = runs.user_path(workdir, flag)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {workdir!r} is a file, not a folder: give a folder path "
                         "(it is created if missing)")


def check_has_clips(source, shards: str) -> None:
    """The latent shards hold at least one clip (an empty source would stop the pipeline)."""
    if len(source) == 0:
        raise ValueError(f"the latent shards in {shards!r} hold no clips: re-run `vdit encode` "
                         "(or curate) and check that it kept some clips")


def check_record_keys(source, keys: dict[str, str]) -> None:
    """Each latent shard's first record holds every key in `keys` ({key: what needs it}), so a
    shard encoded without them fails here, named, rather than deep in the input pipeline."""
    if not keys:
        return
    for path, record in source.first_records():
        missing = [k for k in keys if record is not None and k not in record]
        if missing:
            raise ValueError(f"latent shard {path!r} has no {missing[0]!r} in its records, which "
                             f"{keys[missing[0]]} needs; its records have {sorted(record)}")


def check_first_records(source, check) -> None:
    """Some latent shard's first record passes `check` (`pipeline.record_check`). When none does,
    the shards were encoded for another model (latent channels, text format): an error naming one,
    instead of a pipeline that skips every record while it waits for one it can use. (A single
    bad record is skipped and counted later, like a corrupt one.)"""
    failures = []
    for path, record in source.first_records():
        if record is None:
            continue
        try:
            check(record)
            return
        except ValueError as e:
            failures.append((path, e))
    if failures:
        path, e = failures[0]
        raise ValueError(f"latent shard {path!r} does not fit the model: its first record has {e} "
                         f"(as do the first records of all {len(failures)} shards); were the "
                         "shards encoded for this config (model.in_channels, data.text_format, "
                         "the VAE)?") from e


def check_batch_divides(rows: int, mesh: Mesh) -> None:
    """data.rows_per_batch splits evenly over the mesh axes that shard rows (data x fsdp)."""
    shards = 1
    for axis in BATCH_AXES:
        shards *= int(mesh.shape.get(axis, 1))
    if rows % shards:
        sizes = ", ".join(f"{a}={mesh.shape.get(a, 1)}" for a in BATCH_AXES)
        raise ValueError(f"config key 'data.rows_per_batch' = {rows} does not divide over the mesh "
                         f"({sizes}: rows are split {shards} ways); use a multiple of {shards} "
                         "or change config.mesh")
