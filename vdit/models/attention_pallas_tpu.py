"""Block-sparse segment attention for TPU: a Pallas (Mosaic) flash kernel, forward and backward.

`block_sparse_attention(q, k, v, q_ids, kv_ids, block_q, block_kv)`: q `[B, H, S, Dh]`, k/v
`[B, H, L, Dh]`, ids `[B, S]` / `[B, L]` int32 with S, L multiples of the blocks (the caller pads
with negative ids, which meet nothing). Returns `[B, H, S, Dh]`; rows that see no key give 0.

The grid is (B, H, query blocks, key steps). The block runs of `attention_blocks.kernel_maps`
(`[B, n]` starts and counts) ride in SMEM as scalar prefetch (`pltpu.PrefetchScalarGridSpec`):
step j of query block i fetches key block `start[b, i] + j` and computes only while
j < count[b, i]. Past the count the index stays on the run's last block, so the pipeline issues
no new DMA and the step costs only the grid overhead. The backward pass runs two kernels the same
way: dq over the query blocks' runs, dk/dv over the key blocks' runs (the transposed map).

Residuals kept for the backward pass: q, k, v, the output and a float32 log-sum-exp `[B, H, S]`
(what `attention_proxy` models for `vdit plan`). Logits are float32; the softmax scale is 1/sqrt(Dh).
On a TPU the blocks must be multiples of 128 (lanes); interpret mode (tests, CPU) takes any size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vdit.models import attention_blocks

LANES, SUBLANES = 128, 8
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def block_sparse_attention(q, k, v, q_ids, kv_ids, block_q: int, block_kv: int,
                           interpret: bool = False):
    """Shapes in the module doc. Differentiable in q, k, v."""
    fwd_map, bwd_map = attention_blocks.kernel_maps(q_ids, kv_ids, block_q, block_kv)
    cfg = (block_q, block_kv, interpret)
    return _attention(cfg, q, k, v, q_ids, kv_ids, fwd_map, bwd_map)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_ids, kv_ids, fwd_map, bwd_map):
    return _forward(cfg, q, k, v, q_ids, kv_ids, fwd_map)[0]


def _attention_fwd(cfg, q, k, v, q_ids, kv_ids, fwd_map, bwd_map):
    out, lse = _forward(cfg, q, k, v, q_ids, kv_ids, fwd_map)
    return out, (q, k, v, q_ids, kv_ids, fwd_map, bwd_map, out, lse)


def _attention_bwd(cfg, res, g):
    q, k, v, q_ids, kv_ids, fwd_map, bwd_map, out, lse = res
    di = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, H, S]
    dq = _backward_dq(cfg, q, k, v, q_ids, kv_ids, fwd_map, lse, di, g)
    dk, dv = _backward_dkv(cfg, q, k, v, q_ids, kv_ids, bwd_map, lse, di, g)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _lane_ids(ids):
    """`[B, N]` -> `[B, N, 128]`: ids broadcast along lanes (a column per block)."""
    return lax.broadcast_in_dim(ids, ids.shape + (LANES,), (0, 1))


def _sublane_ids(ids):
    """`[B, N]` -> `[B, 8, N]`: ids broadcast along sublanes (a row per block)."""
    return lax.broadcast_in_dim(ids, (ids.shape[0], SUBLANES, ids.shape[1]), (0, 2))


def _lanes(x, n: int):
    """`[rows, 128]` lane-replicated values -> `[rows, n]` (tiled as the TPU flash kernel does)."""
    if n <= LANES:
        return x[:, :n]
    if n % LANES:
        raise ValueError(f"block width {n} is not a multiple of {LANES} lanes")
    return jnp.tile(x, (1, n // LANES))


def _row(ref):
    """A `(1, n)` block of a per-query float32 vector -> the column `(n, 1)`."""
    return jnp.expand_dims(ref[0], -1)


def _masked_logits(a, b, a_ids_ref, b_ids_ref, scale):
    """`[na, nb]` float32 logits a b^T and the same-segment mask; a's ids lane-replicated
    `[na, 128]`, b's sublane-replicated `[8, nb]`."""
    s = lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * scale
    mask = _lanes(a_ids_ref[...], s.shape[1]) == b_ids_ref[:1, :]
    return jnp.where(mask, s, MASK_VALUE), mask


def _fwd_kernel(start_ref, cnt_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, scale, nq, nk):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < cnt_ref[b * nq + i])
    def _run():
        v = v_ref[...]
        s, mask = _masked_logits(q_ref[...], k_ref[...], qid_ref, kid_ref, scale)
        m_prev = m_sc[...]  # [bq, 128], lanes replicated
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - _lanes(m_next, s.shape[1])), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * _lanes(alpha, pv.shape[1]) + pv

    @pl.when(j == nk - 1)
    def _end():
        denom = l_sc[...]
        seen = denom > 0.0  # a row that saw no key: output 0, lse huge (its p is 0 in backward)
        inv = _lanes(1.0 / jnp.where(seen, denom, 1.0), acc_sc.shape[1])
        o_ref[...] = (acc_sc[...] * inv).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, denom, 1.0)), -MASK_VALUE)


def _step_block(row, j, start_ref, cnt_ref):
    """The block that step j of a run fetches: start + j, held at the run's last block."""
    return start_ref[row] + lax.min(j, lax.max(cnt_ref[row] - 1, 0))


def _kv_map(nq):
    """index_map of a key-side block in the forward/dq grid."""
    def index_map(b, h, i, j, start_ref, cnt_ref):
        return b, h, _step_block(b * nq + i, j, start_ref, cnt_ref), 0
    return index_map


def _kid_map(nq):
    def index_map(b, h, i, j, start_ref, cnt_ref):
        return b, 0, _step_block(b * nq + i, j, start_ref, cnt_ref)
    return index_map


def _forward(cfg, q, k, v, q_ids, kv_ids, fwd_map):
    (bq, bk, interpret), (bsz, heads, s_len, d) = cfg, q.shape
    nq, nk = s_len // bq, k.shape[2] // bk
    start, cnt = fwd_map
    kernel = functools.partial(_fwd_kernel, scale=1.0 / np.sqrt(d), nq=nq, nk=nk)
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), _kv_map(nq))
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(bsz, heads, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec,
                      pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
                      pl.BlockSpec((None, SUBLANES, bk), _kid_map(nq))],
            out_specs=[q_spec, pl.BlockSpec((None, None, bq, LANES),
                                            lambda b, h, i, j, *_: (b, h, i, 0))],
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((bsz, heads, s_len, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="vdit_block_sparse_fwd",
    )(start.reshape(-1), cnt.reshape(-1), q, k, v, _lane_ids(q_ids), _sublane_ids(kv_ids))
    return out, lse[..., 0]


def _dq_kernel(start_ref, cnt_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, lse_ref, di_ref, do_ref,
               dq_ref, dq_sc, *, scale, nq, nk):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(j < cnt_ref[b * nq + i])
    def _run():
        k, v = k_ref[...], v_ref[...]
        s, mask = _masked_logits(q_ref[...], k, qid_ref, kid_ref, scale)
        p = jnp.where(mask, jnp.exp(s - _row(lse_ref)), 0.0)
        dp = lax.dot_general(do_ref[...].astype(v.dtype), v, _NT,
                             preferred_element_type=jnp.float32)
        ds = p * (dp - _row(di_ref))
        dq_sc[...] += lax.dot_general(ds.astype(k.dtype), k, _NN,
                                      preferred_element_type=jnp.float32)

    @pl.when(j == nk - 1)
    def _end():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _backward_dq(cfg, q, k, v, q_ids, kv_ids, fwd_map, lse, di, g):
    (bq, bk, interpret), (bsz, heads, s_len, d) = cfg, q.shape
    nq, nk = s_len // bq, k.shape[2] // bk
    start, cnt = fwd_map
    kernel = functools.partial(_dq_kernel, scale=1.0 / np.sqrt(d), nq=nq, nk=nk)
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), _kv_map(nq))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(bsz, heads, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec,
                      pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
                      pl.BlockSpec((None, SUBLANES, bk), _kid_map(nq)),
                      row_spec, row_spec, q_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="vdit_block_sparse_dq",
    )(start.reshape(-1), cnt.reshape(-1), q, k, v, _lane_ids(q_ids), _sublane_ids(kv_ids),
      lse[:, :, None, :], di[:, :, None, :], g)


def _dkv_kernel(start_ref, cnt_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, lse_ref, di_ref,
                do_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, nq, nk):
    """Works on transposed logits `[bk, bq]` (as splash's dk/dv kernel): every dot is NN or NT,
    per-query vectors are rows `(1, bq)`; key ids lane-, query ids sublane-replicated."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)  # i: key block, j: step

    @pl.when(j == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(j < cnt_ref[b * nk + i])
    def _run():
        q, v, do = q_ref[...], v_ref[...], do_ref[...]
        st, mask = _masked_logits(k_ref[...], q, kid_ref, qid_ref, scale)  # [bk, bq]
        pt = jnp.where(mask, jnp.exp(st - lse_ref[...]), 0.0)
        dv_sc[...] += lax.dot_general(pt.astype(do.dtype), do, _NN,
                                      preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v, do.astype(v.dtype), _NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - di_ref[...])
        dk_sc[...] += lax.dot_general(dst.astype(q.dtype), q, _NN,
                                      preferred_element_type=jnp.float32)

    @pl.when(j == nq - 1)
    def _end():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward_dkv(cfg, q, k, v, q_ids, kv_ids, bwd_map, lse, di, g):
    (bq, bk, interpret), (bsz, heads, s_len, d) = cfg, q.shape
    nq, nk = s_len // bq, k.shape[2] // bk
    start, cnt = bwd_map  # [B, nk] each
    kernel = functools.partial(_dkv_kernel, scale=1.0 / np.sqrt(d), nq=nq, nk=nk)

    def q_side(b, h, i, j, start_ref, cnt_ref):  # step j's query block for key block i
        return _step_block(b * nk + i, j, start_ref, cnt_ref)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *r: (b, h, q_side(b, h, i, j, *r), 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, *_: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq),
                            lambda b, h, i, j, *r: (b, h, 0, q_side(b, h, i, j, *r)))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(bsz, heads, nk, nq),
            in_specs=[q_spec, kv_spec, kv_spec,
                      pl.BlockSpec((None, SUBLANES, bq),
                                   lambda b, h, i, j, *r: (b, 0, q_side(b, h, i, j, *r))),
                      pl.BlockSpec((None, bk, LANES), lambda b, h, i, j, *_: (b, i, 0)),
                      row_spec, row_spec, q_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="vdit_block_sparse_dkv",
    )(start.reshape(-1), cnt.reshape(-1), q, k, v, _sublane_ids(q_ids), _lane_ids(kv_ids),
      lse[:, :, None, :], di[:, :, None, :], g)
