"""A memory stand-in for fused attention (backend "memory_proxy"), used only by `vdit plan`.

Fused kernels (block_sparse and splash on TPU, block_sparse and cuDNN flash on GPU) never hold the
`[B, H, S, L]` logits: forward keeps the output and a per-row log-sum-exp, backward reads q, k, v,
out, lse and the incoming gradient and writes dq, dk, dv. The block_sparse kernels also keep their
block runs (`attention_blocks.kernel_maps`: starts and counts, `[B, nq]` and `[B, nk]` int32),
which the proxy builds and keeps too, at the GPU kernel's (smaller, so more) blocks.
Compiling the plain XLA attention on CPU would instead report S x L
buffers (tens of GB per head at 720p), so the planner swaps in this function: O(S) arithmetic with
exactly those residuals and gradient shapes, so that XLA's buffer assignment sees the memory a fused
kernel needs. Its values are meaningless; never train or sample with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdit.models import attention_blocks


def proxy_attention(q, k, v, q_segment_ids, kv_segment_ids, blocks=(64, 64)):
    """q `[B, S, H, Dh]`, k/v `[B, L, H, Dh]` -> `[B, S, H, Dh]`; `blocks` of the block lists."""
    bq, bk = blocks
    q_ids = attention_blocks.pad_ids(q_segment_ids, -(-q.shape[1] // bq) * bq)
    kv_ids = attention_blocks.pad_ids(kv_segment_ids, -(-k.shape[1] // bk) * bk)
    maps = attention_blocks.kernel_maps(q_ids, kv_ids, bq, bk)
    return _proxy(q, k, v, maps)


@jax.custom_vjp
def _proxy(q, k, v, maps):
    return _forward(q, k, v, maps)[0]


def _forward(q, k, v, maps):
    kv = jnp.mean(k, axis=1, keepdims=True) + jnp.mean(v, axis=1, keepdims=True)  # [B, 1, H, Dh]
    out = (q * kv).astype(q.dtype)
    lse = jnp.sum(q.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, H, S] float32
    return out, (q, k, v, out, lse, maps)


def _backward(residuals, g):
    q, k, v, out, lse, maps = residuals
    row = lse.transpose(0, 2, 1)[..., None].astype(q.dtype)  # [B, S, H, 1]
    dq = g * (jnp.mean(k, axis=1, keepdims=True) + out) + row
    gq = jnp.sum(g * q, axis=1, keepdims=True)  # [B, 1, H, Dh]
    # The runs are read (as the kernels read them) so that they stay alive until here.
    used = sum(jnp.sum(x[0, :1]) for x in jax.tree.leaves(maps)).astype(q.dtype) * 0
    return (dq.astype(q.dtype) + used, (k * gq).astype(k.dtype), (v * gq).astype(v.dtype),
            jax.tree.map(lambda x: None, maps))


_proxy.defvjp(_forward, _backward)
