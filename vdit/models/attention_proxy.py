"""A memory stand-in for fused attention (backend "memory_proxy"), used only by `vdit plan`.

Fused kernels (splash on TPU, cuDNN flash on GPU) never hold the `[B, H, S, L]` logits: forward
keeps the output and a per-row log-sum-exp, backward reads q, k, v, out, lse and the incoming
gradient and writes dq, dk, dv. Compiling the plain XLA attention on CPU would instead report S x L
buffers (tens of GB per head at 720p), so the planner swaps in this function: O(S) arithmetic with
exactly those residuals and gradient shapes, so that XLA's buffer assignment sees the memory a fused
kernel needs. Its values are meaningless; never train or sample with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def proxy_attention(q, k, v, q_segment_ids, kv_segment_ids):
    """q `[B, S, H, Dh]`, k/v `[B, L, H, Dh]` -> `[B, S, H, Dh]` (segment ids are not used)."""
    del q_segment_ids, kv_segment_ids  # [B, S] ints: negligible next to q/k/v
    return _proxy(q, k, v)


@jax.custom_vjp
def _proxy(q, k, v):
    return _forward(q, k, v)[0]


def _forward(q, k, v):
    kv = jnp.mean(k, axis=1, keepdims=True) + jnp.mean(v, axis=1, keepdims=True)  # [B, 1, H, Dh]
    out = (q * kv).astype(q.dtype)
    lse = jnp.sum(q.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, H, S] float32
    return out, (q, k, v, out, lse)


def _backward(residuals, g):
    q, k, v, out, lse = residuals
    row = lse.transpose(0, 2, 1)[..., None].astype(q.dtype)  # [B, S, H, 1]
    dq = g * (jnp.mean(k, axis=1, keepdims=True) + out) + row
    gq = jnp.sum(g * q, axis=1, keepdims=True)  # [B, 1, H, Dh]
    return dq.astype(q.dtype), (k * gq).astype(k.dtype), (v * gq).astype(v.dtype)


_proxy.defvjp(_forward, _backward)
