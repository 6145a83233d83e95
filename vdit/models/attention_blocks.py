"""Which (query block, key block) pairs of a packed row can hold a same-segment pair.

The block-sparse attention kernels (`attention_pallas_tpu.py`, `attention_pallas_gpu.py`) compute
only the block pairs listed here; everything is computed on device from the segment ids, so the
map follows the data under `jit`.

A block is summarised by the min/max of its positive segment ids and whether it holds id 0
(padding, which attends padding). Two blocks meet when their positive ranges overlap or both hold
padding. Negative ids mark the rows the kernels add to reach a block multiple: they meet nothing.
For the pipeline's rows (segments contiguous, ids increasing along the row, padding at the end)
two ranges overlap exactly when the blocks share a segment, so the map is tight; for any other
layout it is conservative (never skips a pair that holds a same-segment entry).

The kernels walk, per query block, the run of key blocks from the first to the last one it meets
(and per key block the run of query blocks, for dk/dv): `[B, n]` int32 starts and counts, O(n)
scalars however long the row (TPU scalar memory is small). For the pipeline's rows the meeting
blocks are contiguous, so the run is exactly the map; for any other layout it is a superset, and
the in-block segment mask keeps the result exact either way.

Shapes: segment ids `[B, N]` with N a multiple of the block; per-block summaries `[B, N/block]`;
pair map `[B, nq, nk]` bool; runs: starts and counts `[B, nq]` int32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_NO_ID = np.iinfo(np.int32).max


def pad_ids(ids, size: int, value: int = -1):
    """`[B, N]` ints -> `[B, size]` int32, the tail filled with `value` (default: meets nothing)."""
    ids = jnp.asarray(ids, jnp.int32)
    extra = size - ids.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad segment ids of length {ids.shape[1]} down to {size}")
    return jnp.pad(ids, ((0, 0), (0, extra)), constant_values=value) if extra else ids


def block_summary(ids, block: int):
    """`[B, N]` ids -> (lo, hi, has_pad), each `[B, N // block]`: the positive id range and padding."""
    b, n = ids.shape
    if n % block:
        raise ValueError(f"segment ids of length {n} are not a multiple of the block {block}")
    x = ids.reshape(b, n // block, block)
    real = x > 0
    lo = jnp.min(jnp.where(real, x, _NO_ID), axis=-1)
    hi = jnp.max(jnp.where(real, x, -1), axis=-1)  # an empty block: lo > hi, overlaps nothing
    return lo, hi, jnp.any(x == 0, axis=-1)


def block_pairs(q_ids, kv_ids, block_q: int, block_kv: int):
    """`[B, nq, nk]` bool: the query block and key block may share a segment."""
    qlo, qhi, qpad = block_summary(q_ids, block_q)
    klo, khi, kpad = block_summary(kv_ids, block_kv)
    overlap = (qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None])
    return overlap | (qpad[:, :, None] & kpad[:, None, :])


def block_runs(pairs):
    """`[B, nq, nk]` bool -> (start, count), each `[B, nq]` int32: the first key block a query
    block meets and how many follow up to the last one it meets (0 and 0 when it meets none)."""
    nk = pairs.shape[-1]
    meets = jnp.any(pairs, axis=-1)
    first = jnp.argmax(pairs, axis=-1).astype(jnp.int32)
    last = (nk - 1 - jnp.argmax(pairs[..., ::-1], axis=-1)).astype(jnp.int32)
    return jnp.where(meets, first, 0), jnp.where(meets, last - first + 1, 0)


def kernel_maps(q_ids, kv_ids, block_q: int, block_kv: int):
    """((start, count) per query block, (start, count) per key block), all `[B, n]` int32."""
    pairs = block_pairs(q_ids, kv_ids, block_q, block_kv)
    return block_runs(pairs), block_runs(jnp.swapaxes(pairs, 1, 2))


def computed_pairs(q_ids, kv_ids, block_q: int, block_kv: int):
    """`[B]` int32: the block pairs the kernels compute (the forward's runs, summed)."""
    (_, count), _ = kernel_maps(q_ids, kv_ids, block_q, block_kv)
    return jnp.sum(count, axis=-1)


def needed_pairs(q_ids, kv_ids, block_q: int, block_kv: int) -> np.ndarray:
    """`[B, nq, nk]` bool, exact: the block pair holds at least one same-segment (query, key) pair.

    Host-side numpy (for benchmarks and tests): per block the set of ids, intersected.
    """
    q_ids, kv_ids = np.asarray(q_ids), np.asarray(kv_ids)
    ids = np.union1d(q_ids[q_ids >= 0], kv_ids[kv_ids >= 0])

    def present(x, block):  # [B, nblocks, n_ids] bool
        b, n = x.shape
        onehot = x.reshape(b, n // block, block)[..., None] == ids
        return onehot.any(axis=2)

    pq, pk = present(q_ids, block_q), present(kv_ids, block_kv)
    return np.einsum("bqi,bki->bqk", pq.astype(np.int32), pk.astype(np.int32)) > 0
