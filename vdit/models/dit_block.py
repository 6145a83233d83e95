"""One Wan2.1 transformer block over packed tokens, and its attention layers.

Block (diffusers' WanTransformerBlock numerics): adaLN-modulated self-attention with RMS-normed q/k
(across all heads) and 3D RoPE, masked by segment; cross-attention to the own segment's text behind
an optional affine LayerNorm; adaLN-modulated GELU(tanh) FFN. Image-conditioned models (Wan2.1 I2V,
`image_context` given) add a second cross-attention branch inside `attn2`: the same queries attend
the embedded image tokens through their own k/v projections (`add_k_proj`, `add_v_proj`, RMS-normed
`norm_added_k`), and the two attention outputs are summed before `to_out`. The residual stream is
float32 (as Wan's original code accumulates it); matmuls run in the compute `dtype`.

Modulation is per token: `mod` `[B, K, 6, D]` holds, per segment, the block's
`scale_shift_table + time_proj(t)`; `seg_index` `[B, S, 1]` picks each token's row.
`checkpoint_name` tags for remat policies: query, key, value, self_attn, cross_attn, mlp_hidden.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vdit.config import REMAT_POLICIES
from vdit.models.attention import attention
from vdit.models.layers import MLP, Dense, LayerNorm, RMSNorm, apply_rope, layer_norm, modulate

TOKENS = ("activation_batch", "activation_length", "activation_embed")
HEADS = ("activation_batch", "activation_length", "activation_heads", None)
TEXT_HEADS = ("activation_batch", "activation_text_length", "activation_heads", None)
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")


class Attention(nn.Module):
    """q from x, k/v from `kv_input` (x itself for self-attention); RMS-normed q/k; optional RoPE."""

    heads: int
    head_dim: int
    eps: float
    backend: str
    kv_axes: tuple = HEADS
    dtype: Any = jnp.float32
    matmul_dtype: Any = None  # vdit/models/layers.py Dense

    def _proj(self, name, x):
        return Dense((self.heads, self.head_dim), ("embed", "heads", "kv"), ("heads", "kv"),
                     dtype=self.dtype, matmul_dtype=self.matmul_dtype, name=name)(x)

    @nn.compact
    def __call__(self, x, kv_input, q_segment_ids, kv_segment_ids, rope=None, image=None):
        """`image`: None, or (image tokens `[B, N, D]`, their segment ids `[B, N]`) for the
        image branch of I2V cross-attention."""
        dim = x.shape[-1]
        norm = lambda name: RMSNorm(self.eps, ("heads", "kv"), name=name)  # across all heads
        q = norm("norm_q")(self._proj("to_q", x))
        k = norm("norm_k")(self._proj("to_k", kv_input))
        v = self._proj("to_v", kv_input)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = checkpoint_name(nn.with_logical_constraint(q, HEADS), "query")
        k = checkpoint_name(nn.with_logical_constraint(k, self.kv_axes), "key")
        v = checkpoint_name(nn.with_logical_constraint(v, self.kv_axes), "value")
        # Self-attention (kv_axes == HEADS) goes sequence-parallel when tokens are sharded.
        out = attention(q, k, v, q_segment_ids, kv_segment_ids, backend=self.backend,
                        sequence_parallel=self.kv_axes == HEADS, matmul_dtype=self.matmul_dtype)
        if image is not None:
            tokens, image_ids = image
            k_img = norm("norm_added_k")(self._proj("add_k_proj", tokens))
            v_img = self._proj("add_v_proj", tokens)
            k_img = nn.with_logical_constraint(k_img, self.kv_axes)
            v_img = nn.with_logical_constraint(v_img, self.kv_axes)
            out = out + attention(q, k_img, v_img, q_segment_ids, image_ids, backend=self.backend,
                                  matmul_dtype=self.matmul_dtype)
        out = nn.with_logical_constraint(out, HEADS)
        return Dense((dim,), ("heads", "kv", "embed"), ("embed",), in_dims=2, dtype=self.dtype,
                     matmul_dtype=self.matmul_dtype, name="to_out")(out)


def _take(mod_k, seg_index, j):
    """Row j of the per-segment modulation for every token: `[B, K, 6, D]` -> `[B, S, D]`."""
    return jnp.take_along_axis(mod_k[:, :, j], seg_index, axis=1)


class WanBlock(nn.Module):
    """One block; called by `nn.scan` as `(x, None) = block(x, *broadcast_inputs)`."""

    heads: int
    head_dim: int
    ffn_dim: int
    eps: float
    cross_attn_norm: bool
    backend: str
    dtype: Any = jnp.float32
    matmul_dtype: Any = None

    @nn.compact
    def __call__(self, x, context, time_mod, seg_index, rope, segment_ids, cross_q_ids,
                 context_segment_ids, image=None):
        dim = x.shape[-1]
        table = self.param("scale_shift_table", nn.with_logical_partitioning(
            nn.initializers.normal(dim ** -0.5), ("modulation", "embed")), (6, dim), jnp.float32)
        mod_k = time_mod + table  # [B, K, 6, D]
        mod = lambda j: _take(mod_k, seg_index, j)
        attn = lambda name, **kw: Attention(self.heads, self.head_dim, self.eps, self.backend,
                                            dtype=self.dtype, matmul_dtype=self.matmul_dtype,
                                            name=name, **kw)

        h = modulate(layer_norm(x, self.eps), mod(0), mod(1)).astype(self.dtype)
        h = attn("attn1")(h, h, segment_ids, segment_ids, rope)
        x = x + checkpoint_name(h, "self_attn").astype(jnp.float32) * mod(2)
        x = nn.with_logical_constraint(x, TOKENS)

        h = LayerNorm(self.eps, name="norm2")(x) if self.cross_attn_norm else x
        h = attn("attn2", kv_axes=TEXT_HEADS)(h.astype(self.dtype), context, cross_q_ids,
                                              context_segment_ids, image=image)
        x = x + checkpoint_name(h, "cross_attn").astype(jnp.float32)

        h = modulate(layer_norm(x, self.eps), mod(3), mod(4)).astype(self.dtype)
        h = MLP(self.ffn_dim, dim, "embed", "mlp", "embed", "gelu_tanh", dtype=self.dtype,
                act_constraint=MLP_HIDDEN, matmul_dtype=self.matmul_dtype, name="ffn")(h)
        x = x + h.astype(jnp.float32) * mod(5)
        return nn.with_logical_constraint(x, TOKENS), None


# One policy per name of `vdit.config.REMAT_POLICIES` (which the config check uses).
_REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn": jax.checkpoint_policies.save_only_these_names(
        "query", "key", "value", "self_attn", "cross_attn"),
}


def scanned_blocks(num_layers: int, remat: str):
    """The block class stacked `num_layers` times with `nn.scan` (one compiled block)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat={remat!r} is not one of {list(REMAT_POLICIES)}")
    block = WanBlock
    if remat != "none":
        block = nn.remat(WanBlock, policy=_REMAT[remat], prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * 8, length=num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})
