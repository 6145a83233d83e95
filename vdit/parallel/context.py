"""Sequence (context) parallel self-attention for long videos.

The token axis of the DiT's activations is sharded over the mesh axis that the logical rules give
`activation_length` (the `sequence` axis in DIT_RULES). Everything but self-attention is
token-local, so only self-attention needs the other devices' tokens. Two exact schedules (same
numbers as one device, segment masks intact), run per device in `jax.shard_map`:

  ulysses       (DeepSpeed-Ulysses) an all-to-all turns each device's `[B, S/P, H, Dh]` q, k, v
                into `[B, S, H/P, Dh]`: the whole sequence for a slice of the heads. The segment
                ids are all-gathered, the ordinary per-device kernel (any backend) runs,
                and a second all-to-all returns the output to token shards. Needs the per-device
                heads (after the `tensor` split) divisible by P. Traffic: four all-to-alls of a
                device's own q-sized shard, independent of P.
  allgather_kv  each device keeps its query block and all-gathers k, v and their segment ids, then
                attends its S/P queries to all S keys. Used when the heads do not divide by P
                (e.g. 12 heads over 8); holds the whole k, v per device.

`sequence_parallel_attention` picks ulysses when it can. Batch and heads stay sharded as the rules
map `activation_batch` / `activation_heads`. The mesh is the one set by `jax.set_mesh` or, for
older code, by `with mesh:`.
"""

from __future__ import annotations

import functools
import math
import warnings

import flax.linen as nn
import jax
from jax.interpreters import pxla
from jax.sharding import PartitionSpec

SCHEDULES = ("ulysses", "allgather_kv")
_LOGICAL = ("activation_batch", "activation_length", "activation_heads", None)


def current_mesh():
    """The mesh in context (`jax.set_mesh`, else a legacy `with mesh:`), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    with warnings.catch_warnings():  # the legacy context is deprecated but still in use
        warnings.simplefilter("ignore", DeprecationWarning)
        physical = pxla.thread_resources.env.physical_mesh
    return None if physical.empty else physical


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _size(mesh, entry) -> int:
    return math.prod(mesh.shape[a] for a in _axes(entry))


def sequence_parallel_size(mesh=None) -> int:
    """Devices the token axis is split over under the current mesh and logical rules (1 = none)."""
    mesh = mesh if mesh is not None else current_mesh()
    if mesh is None:
        return 1
    length = nn.logical_to_mesh_axes(_LOGICAL)[1]
    return _size(mesh, length)


def pick_schedule(heads: int, heads_split: int, seq_split: int) -> str:
    """'ulysses' when the per-device heads divide by the sequence split, else 'allgather_kv'."""
    if heads % heads_split:
        raise ValueError(f"{heads} attention heads cannot be split over {heads_split} devices "
                         "(mesh axis of activation_heads, normally `tensor`)")
    return "ulysses" if (heads // heads_split) % seq_split == 0 else "allgather_kv"


def sequence_parallel_attention(q, k, v, q_segment_ids, kv_segment_ids, attend,
                                schedule: str | None = None):
    """Self-attention with tokens sharded over the mesh: q/k/v `[B, S, H, Dh]`, ids `[B, S]`.

    `attend(q, k, v, q_segment_ids, kv_segment_ids)` is the per-device segment-masked attention
    run inside the shard_map (a kernel of `vdit.models.attention`, which passes its own: this
    module stays below the models); `schedule` None picks one (module doc). Returns
    `[B, S, H, Dh]` sharded like q.
    """
    mesh = current_mesh()
    if mesh is None:
        raise ValueError("sequence_parallel_attention needs a mesh (jax.set_mesh) with a "
                         "sequence axis")
    batch, length, heads, _ = nn.logical_to_mesh_axes(_LOGICAL)
    p, b, s, h = _size(mesh, length), q.shape[0], q.shape[1], q.shape[2]
    if k.shape[1] != s:
        raise ValueError(f"sequence-parallel attention is for self-attention: q has {s} tokens, "
                         f"k has {k.shape[1]}")
    if s % p:
        raise ValueError(f"{s} tokens per row do not divide over the {p} devices of the "
                         f"sequence axis (config.mesh.sequence); pad rows to a multiple of {p} "
                         "(config.data.tokens_per_row) or use a smaller sequence size")
    # Rows or heads that do not divide over their axes stay whole there (computed redundantly),
    # e.g. sampling one video on a mesh with data > 1.
    batch = batch if b % _size(mesh, batch) == 0 else None
    heads = heads if h % _size(mesh, heads) == 0 else None
    schedule = schedule or pick_schedule(h, _size(mesh, heads), p)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown sequence-parallel schedule {schedule!r}; expected {SCHEDULES}")
    if schedule == "ulysses" and (h // _size(mesh, heads)) % p:
        raise ValueError(f"ulysses needs per-device heads ({h} / {_size(mesh, heads)}) divisible "
                         f"by the sequence split {p}; use 'allgather_kv'")
    spec = PartitionSpec(batch, length, heads, None)
    seg_spec = PartitionSpec(batch, length)
    body = _ulysses if schedule == "ulysses" else _allgather_kv
    fn = functools.partial(body, axis=_axes(length), attend=attend)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, seg_spec),
                         out_specs=spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def _gather_tokens(x, axis):
    return jax.lax.all_gather(x, axis, axis=1, tiled=True)


def _ulysses(q, k, v, q_seg, kv_seg, *, axis, attend):
    """Per device: `[b, S/P, h, Dh]` -> whole sequence for h/P heads -> attention -> back."""
    to_heads = lambda x: jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
    out = attend(to_heads(q), to_heads(k), to_heads(v), _gather_tokens(q_seg, axis),
                 _gather_tokens(kv_seg, axis))
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def _allgather_kv(q, k, v, q_seg, kv_seg, *, axis, attend):
    """Per device: this block's queries against every token's keys and values."""
    return attend(q, _gather_tokens(k, axis), _gather_tokens(v, axis), q_seg,
                  _gather_tokens(kv_seg, axis))
