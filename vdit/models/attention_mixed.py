"""Segment-masked attention with low-precision matmul operands and a hand-written backward pass.

`mixed_attention(q, k, v, q_segment_ids, kv_segment_ids, low)`: q `[B, S, H, Dh]`, k/v
`[B, L, H, Dh]`, segment ids `[B, S]` / `[B, L]`; returns `[B, S, H, Dh]` in q's dtype. It is the
"xla" backend's math (float32 logits and softmax, a finite mask value, scale 1/sqrt(Dh)) with the
two products QK^T and PV taking operands rounded to `low` (bfloat16) and summing in float32: what
`config.model.matmul_dtype` does for the dense layers (vdit/models/mixed_dot.py), here for the
attention core. torch's autocast does the same to scaled_dot_product_attention.

Why by hand (a lever on CPUs with bfloat16 units; none on AVX2-only ones, see mixed_dot.py): XLA:CPU
runs a bfloat16 x bfloat16 -> float32 product on the AMX units only when both operands are
row-major and lhs is contracted over its last axis. Autodiff of the
plain formula contracts the `[S, L]` probabilities over S for dK and dV (the slow path, 6x a fast
product at 320 tokens) and differentiates the softmax op by op. The backward here is the
flash-attention one: dS = P * (dP - rowsum(dO * O)), and the two products over S are written as
dK^T = Q^T dS and dV^T = dO^T P, so only the small `[S, Dh]` operands are transposed, never the
`[S, L]` ones. The probabilities are kept in `low` (they are PV's operand already).

Being a custom_vjp, it has no forward-mode rule; `jax.jvp` paths run with `matmul_dtype` None.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vdit.models.mixed_dot import row_major, stash, unstash

# jax.nn.dot_product_attention's masked logit (its "xla" implementation): finite, so a row that
# sees no key averages all values instead of producing NaN.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def mixed_attention(q, k, v, q_segment_ids, kv_segment_ids, low) -> jax.Array:
    """Attention with `low`-precision products; shapes in the module docstring."""
    mask = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]  # [B, 1, S, L]
    return _attend(q, k, v, mask, jnp.dtype(low))


def _heads_major(x, low):
    """`[B, S, H, D]` -> `[B, H, S, D]` in `low`, stored row-major (the AMX product needs it)."""
    return row_major(jnp.transpose(x, (0, 2, 1, 3)).astype(low))


def _bmm(a, b, contract_b: int):
    """Batched product over the two leading axes, float32 sums: a `[B, H, M, K]` with b
    `[B, H, K, N]` (contract_b=2) or `[B, H, N, K]` (contract_b=3)."""
    return jax.lax.dot_general(a, b, (((3,), (contract_b,)), ((0, 1), (0, 1))),
                               preferred_element_type=jnp.float32)


def _forward(q, k, v, mask, low):
    scale = 1.0 / np.sqrt(q.shape[-1])
    qh, kh, vh = (_heads_major(x, low) for x in (q, k, v))
    logits = jnp.where(mask, _bmm(qh, kh, 3) * scale, _MASKED)  # [B, H, S, L]
    p = jax.nn.softmax(logits, axis=-1).astype(low)
    out = _bmm(p, vh, 2)  # [B, H, S, D] float32
    return out, (qh, kh, vh, p, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, mask, low):
    out, _ = _forward(q, k, v, mask, low)
    return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)


def _attend_fwd(q, k, v, mask, low):
    out, (qh, kh, vh, p, _) = _forward(q, k, v, mask, low)
    # Masked logits are constants, so they pass no gradient. Within a row p is exactly 0 there;
    # a row that sees no key has uniform p, and its logit gradients are zeroed by this factor.
    row_scale = jnp.where(jnp.any(mask, axis=-1, keepdims=True), 1.0 / np.sqrt(q.shape[-1]), 0.0)
    dtypes = tuple(jnp.zeros((0,), x.dtype) for x in (q, k, v))  # carry the input dtypes
    res = (*(stash(x) for x in (qh, kh, vh, p)), out)  # low-precision ones as integers (stash)
    return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype), (res, row_scale, dtypes)


def _attend_bwd(low, residuals, g):
    (qh, kh, vh, p, out), row_scale, (q_dt, k_dt, v_dt) = residuals
    qh, kh, vh, p = (unstash(x, low) for x in (qh, kh, vh, p))
    g32 = jnp.transpose(g, (0, 2, 1, 3)).astype(jnp.float32)  # [B, H, S, D]
    gh = row_major(g32.astype(low))
    dp = _bmm(gh, vh, 3)  # dO V^T: [B, H, S, L]
    rowsum = jnp.sum(g32 * out, axis=-1, keepdims=True)  # [B, H, S, 1] = rowsum(P * dP)
    ds = (p.astype(jnp.float32) * (dp - rowsum) * row_scale).astype(low)  # [B, H, S, L]
    dq = _bmm(ds, kh, 2)  # [B, H, S, D]
    qt = row_major(jnp.swapaxes(qh, 2, 3))  # [B, H, D, S]
    gt = row_major(jnp.swapaxes(gh, 2, 3))
    dk_t = _bmm(qt, ds, 2)  # Q^T dS: [B, H, D, L]
    dv_t = _bmm(gt, p, 2)  # dO^T P: [B, H, D, L]
    to_tokens = lambda x, dt: jnp.transpose(x, (0, 3, 1, 2)).astype(dt.dtype)  # -> [B, L, H, D]
    return (jnp.transpose(dq, (0, 2, 1, 3)).astype(q_dt.dtype), to_tokens(dk_t, k_dt),
            to_tokens(dv_t, v_dt), None)


_attend.defvjp(_attend_fwd, _attend_bwd)
