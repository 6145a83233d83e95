"""Block-sparse segment attention for GPU: a Pallas (Triton) flash kernel, forward and backward.

`block_sparse_attention(q, k, v, q_ids, kv_ids, block_q, block_kv)`: q `[B, S, H, Dh]`, k/v
`[B, L, H, Dh]` (vdit's layout, no transposes), ids `[B, S]` / `[B, L]` int32 with S, L multiples
of the blocks (the caller pads with negative ids, which meet nothing) and Dh a power of two >= 16
(Triton's dot; the caller zero-pads). Returns `[B, S, H, Dh]`; rows that see no key give 0.

No `[S, L]` mask exists anywhere: one program per (query block, row, head) walks the run of key
blocks from `attention_blocks.kernel_maps` (a `fori_loop` from the run's start over its count) and
masks by segment id inside each block. The backward pass runs a dq kernel over the same runs and a
dk/dv kernel over the key blocks' runs (the transposed map). Starts and counts are `[B, n]` int32.

Residuals: q, k, v, the output and a float32 log-sum-exp `[B, H, S]`, as on TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vdit.models import attention_blocks

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def block_sparse_attention(q, k, v, q_ids, kv_ids, block_q: int, block_kv: int, scale: float,
                           interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
    """Shapes in the module doc; `scale` multiplies the logits. Differentiable in q, k, v."""
    fwd_runs, bwd_runs = attention_blocks.kernel_maps(q_ids, kv_ids, block_q, block_kv)
    cfg = (block_q, block_kv, scale, interpret, num_warps, num_stages)
    return _attention(cfg, q, k, v, q_ids, kv_ids, fwd_runs, bwd_runs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_ids, kv_ids, fwd_runs, bwd_runs):
    return _forward(cfg, q, k, v, q_ids, kv_ids, fwd_runs)[0]


def _attention_fwd(cfg, q, k, v, q_ids, kv_ids, fwd_runs, bwd_runs):
    out, lse = _forward(cfg, q, k, v, q_ids, kv_ids, fwd_runs)
    return out, (q, k, v, q_ids, kv_ids, fwd_runs, bwd_runs, out, lse)


def _attention_bwd(cfg, res, g):
    q, k, v, q_ids, kv_ids, fwd_runs, bwd_runs, out, lse = res
    di = jnp.einsum("bshd,bshd->bhs", g.astype(jnp.float32), out.astype(jnp.float32))
    dq = _backward_dq(cfg, q, k, v, q_ids, kv_ids, fwd_runs, lse, di, g)
    dk, dv = _backward_dkv(cfg, q, k, v, q_ids, kv_ids, bwd_runs, lse, di, g)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _logits(q, k, qid, kid, scale):
    """`[bq, bk]` float32 logits (masked) and the same-segment mask."""
    s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale
    mask = qid[:, None] == kid[None, :]
    return jnp.where(mask, s, MASK_VALUE), mask


def _fwd_kernel(start_ref, cnt_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, o_ref, lse_ref, *,
                scale, bk):
    q, qid = q_ref[...], qid_ref[...]
    bq, d = q.shape

    def body(j, carry):
        acc, m, denom = carry
        keys = pl.ds((start_ref[0] + j) * bk, bk)
        v = v_ref[keys, :]
        s, mask = _logits(q, k_ref[keys, :], qid, kid_ref[keys], scale)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        alpha = jnp.exp(m - m_next)
        pv = plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc * alpha[:, None] + pv, m_next, alpha * denom + jnp.sum(p, axis=1)

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, denom = lax.fori_loop(0, cnt_ref[0], body, init)
    seen = denom > 0.0  # a row that saw no key: output 0, lse huge (its p is 0 in backward)
    safe = jnp.where(seen, denom, 1.0)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), -MASK_VALUE)


# A run's start and count, one scalar per program: `[B, n]` blocks of shape (1,) (Triton loads
# a power-of-two block; the scalar is element 0).
run_spec = pl.BlockSpec((None, 1), lambda i, b, h: (b, i))


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, name):
    _, _, _, interpret, num_warps, num_stages = cfg
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name=name)


def _forward(cfg, q, k, v, q_ids, kv_ids, runs):
    (bq, bk, scale, *_), (bsz, s_len, heads, d), l_len = cfg, q.shape, k.shape[1]
    kernel = functools.partial(_fwd_kernel, scale=scale, bk=bk)
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, l_len, None, d), lambda i, b, h: (b, 0, h, 0))
    in_specs = [run_spec, run_spec,
                q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((None, l_len), lambda i, b, h: (b, 0))]
    out_specs = [q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((bsz, heads, s_len), jnp.float32)]
    return _call(kernel, cfg, (s_len // bq, bsz, heads), in_specs, out_specs, out_shape,
                 "vdit_block_sparse_fwd")(*runs, q, k, v, q_ids, kv_ids)


def _dq_kernel(start_ref, cnt_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, lse_ref, di_ref, do_ref,
               dq_ref, *, scale, bk):
    q, qid, do = q_ref[...], qid_ref[...], do_ref[...]
    lse, di = lse_ref[...], di_ref[...]

    def body(j, dq):
        keys = pl.ds((start_ref[0] + j) * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s, mask = _logits(q, k, qid, kid_ref[keys], scale)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = plgpu.dot(do.astype(v.dtype), v, trans_b=True).astype(jnp.float32)
        ds = p * (dp - di[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k).astype(jnp.float32)

    dq = lax.fori_loop(0, cnt_ref[0], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _backward_dq(cfg, q, k, v, q_ids, kv_ids, runs, lse, di, g):
    (bq, bk, scale, *_), (bsz, s_len, heads, d), l_len = cfg, q.shape, k.shape[1]
    kernel = functools.partial(_dq_kernel, scale=scale, bk=bk)
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, l_len, None, d), lambda i, b, h: (b, 0, h, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [run_spec, run_spec,
                q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((None, l_len), lambda i, b, h: (b, 0)),
                row_spec, row_spec, q_spec]
    return _call(kernel, cfg, (s_len // bq, bsz, heads), in_specs, q_spec,
                 jax.ShapeDtypeStruct(q.shape, q.dtype), "vdit_block_sparse_dq")(
        *runs, q, k, v, q_ids, kv_ids, lse, di, g)


def _dkv_kernel(start_ref, cnt_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, lse_ref, di_ref,
                do_ref, dk_ref, dv_ref, *, scale, bq):
    k, v, kid = k_ref[...], v_ref[...], kid_ref[...]

    def body(j, carry):
        dk, dv = carry
        rows = pl.ds((start_ref[0] + j) * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s, mask = _logits(q, k, qid_ref[rows], kid, scale)  # [bq, bk]
        p = jnp.where(mask, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
        dp = plgpu.dot(do.astype(v.dtype), v, trans_b=True).astype(jnp.float32)
        ds = p * (dp - di_ref[rows][:, None])
        return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cnt_ref[0], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_dkv(cfg, q, k, v, q_ids, kv_ids, runs, lse, di, g):
    (bq, bk, scale, *_), (bsz, s_len, heads, d), l_len = cfg, q.shape, k.shape[1]
    kernel = functools.partial(_dkv_kernel, scale=scale, bq=bq)
    q_spec = pl.BlockSpec((None, s_len, None, d), lambda i, b, h: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, bk, None, d), lambda i, b, h: (b, i, h, 0))
    row_spec = pl.BlockSpec((None, None, s_len), lambda i, b, h: (b, h, 0))
    in_specs = [run_spec, run_spec,
                q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, s_len), lambda i, b, h: (b, 0)),
                pl.BlockSpec((None, bk), lambda i, b, h: (b, i)),
                row_spec, row_spec, q_spec]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    return _call(kernel, cfg, (l_len // bk, bsz, heads), in_specs, [kv_spec, kv_spec], out_shape,
                 "vdit_block_sparse_dkv")(*runs, q, k, v, q_ids, kv_ids, lse, di, g)
