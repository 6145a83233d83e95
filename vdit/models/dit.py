"""The diffusion transformer over packed spacetime patches, in Wan2.1's layout (diffusers'
WanTransformer3DModel: same sizes, same numerics, weights convert 1:1 in `vdit/convert/wan_dit.py`).

Two ways to call one module `WanDiT` (same parameters):

  dense  (DESIGN section 4), the default `__call__`:
      v = dit.apply({"params": p}, latents, timesteps, context)
      latents `[B, T', H', W', C_in]`, timesteps `[B]` in [0, 1000), context `[B, L, text_dim]`
      -> `[B, T', H', W', C_out]`. It patchifies, runs `packed` with one segment per row (every
      text token visible), and unpatchifies. Timesteps may also be per token, `[B, N]` over the
      N patch tokens in (t, h, w) order: Wan2.2 TI2V's `expand_timesteps` (clean image tokens
      at 0), as diffusers' transformer takes a 2D timestep.

  packed (DESIGN section 3), `method="packed"`:
      out = dit.apply({"params": p}, tokens, positions, segment_ids, timesteps, context,
                      context_segment_ids, method="packed")
      tokens `[B, S, pt*ph*pw*C_in]` (see `vdit/models/patches.py` for the feature order),
      positions `[B, S, 3]` int (t, h, w) patch-grid indices < rope_max_seq_len,
      segment_ids `[B, S]` int (0 = padding, 1..K a video or image of the row),
      timesteps `[B, K]` (segment k uses column k-1), context `[B, L, text_dim]`,
      context_segment_ids `[B, L]` (0 = padding) -> `[B, S, pt*ph*pw*C_out]`.
      Self-attention stays within a segment, cross-attention sees only the segment's own text,
      and adaLN modulation uses the segment's timestep. Padding tokens give finite garbage.
      Optional `time_ids [B, S]` (1..K) pick each token's timestep column instead of its segment
      id, so tokens of one segment can sit at different noise levels (TI2V's clean first frame).

Image-conditioned models (Wan2.1 I2V / FLF2V: `image_dim` set) take `image_context [B, N,
image_dim]` (CLIP penultimate features; N = pos_embed_seq_len when that is set, i.e. first and last
frame's tokens concatenated; the dense call also takes diffusers' FLF layout [2B, N/2, image_dim])
as a keyword of either call; `packed` also takes `image_segment_ids [B, N]` (default: all 1, every
token of the row sees every image token). The image tokens go through `image_embedder` (LayerNorm,
GELU MLP, LayerNorm, plus `pos_embed` when pos_embed_seq_len is set), then, with
`added_kv_proj_dim` (Wan2.1's published models), a separate k/v branch of each block's
cross-attention; without it they join the text as cross-attention keys, as diffusers puts them in
front of the text.

Micro-conditioned models (`micro_conditioning`, e.g. ("fps", "motion"); see `vdit/models/micro.py`)
take `micro` as a keyword of either call: `{name: [B]}` dense, `{name: [B, K]}` packed (one value per
segment, like the timesteps). With the default () the parameters are exactly Wan2.1's.

Concrete (non-traced) inputs are validated with clear errors (`check_packed`); under jit the data
pipeline is trusted (out-of-range positions then give NaN rather than silently wrap).
Build from a config with `build_dit(config.model)`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.models import micro as micro_lib
from vdit.models import patches
from vdit.models.dit_block import TOKENS, scanned_blocks
from vdit.models.layers import (
    MLP,
    Dense,
    LayerNorm,
    concrete_value,
    layer_norm,
    modulate,
    rope_cos_sin,
    timestep_features,
)

# Config keys of `config.model` beyond the diffusers names (vdit knobs).
VDIT_KEYS = ("dtype", "matmul_dtype", "attention", "remat")


class WanDiT(nn.Module):
    """Wan2.1 DiT. Field names are diffusers' config names, plus the vdit knobs of VDIT_KEYS."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    # diffusers' WanAttention RMS-normalises q and k across heads whatever this names; kept so a
    # converted config round-trips
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    dtype: Any = jnp.float32  # compute dtype; parameters float32 (sampling may hold most in it)
    # None: matmuls in `dtype`; bfloat16: operands rounded to it, float32 sums (mixed_dot.py)
    matmul_dtype: Any = None
    attention: str = "xla"  # see vdit/models/attention.py
    remat: str = "none"  # none | full | save_dots | save_attn
    micro_conditioning: tuple[str, ...] = ()  # vdit/models/micro.py; () = Wan2.1's parameters

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_image_branch(self) -> bool:
        """True for image-conditioned (Wan2.1 I2V) models: they need `image_context`."""
        return self.image_dim is not None

    @property
    def token_in_dim(self) -> int:
        return patches.token_dim(self.patch_size, self.in_channels)

    @property
    def token_out_dim(self) -> int:
        return patches.token_dim(self.patch_size, self.out_channels or self.in_channels)

    def setup(self):
        _check_supported(self)
        d = self.inner_dim
        mm = self.matmul_dtype
        self.patch_embedding = Dense((d,), ("patch_in", "embed"), ("embed",), dtype=self.dtype,
                                     matmul_dtype=mm)
        # The time path stays float32: it feeds every modulation.
        self.time_embedder = MLP(d, d, "time_embed", "mlp", "embed", "silu", dtype=jnp.float32)
        self.time_proj = Dense((6, d), ("time_embed", "modulation", "embed"), ("modulation", "embed"),
                               dtype=jnp.float32)
        self.text_embedder = MLP(d, d, "text_embed", "mlp", "embed", "gelu_tanh", dtype=self.dtype,
                                 matmul_dtype=mm)
        if self.has_image_branch:
            self.image_embedder = ImageEmbedder(d, self.pos_embed_seq_len, dtype=self.dtype)
        if self.micro_conditioning:
            self.micro_embedder = micro_lib.MicroEmbedder(self.micro_conditioning, d, self.freq_dim)
        self.blocks = scanned_blocks(self.num_layers, self.remat)(
            self.num_attention_heads, self.attention_head_dim, self.ffn_dim, self.eps,
            self.cross_attn_norm, self.attention, dtype=self.dtype, matmul_dtype=mm)
        self.scale_shift_table = self.param(
            "scale_shift_table", nn.with_logical_partitioning(
                nn.initializers.normal(d ** -0.5), ("modulation", "embed")), (2, d), jnp.float32)
        self.proj_out = Dense((self.token_out_dim,), ("embed", "patch_in"), ("patch_in",),
                              dtype=self.dtype, matmul_dtype=mm)

    def __call__(self, latents, timesteps, context, image_context=None, micro=None):
        """Dense call: latents `[B, T', H', W', C]` -> model output of the same layout."""
        if latents.ndim != 5 or latents.shape[-1] != self.in_channels:
            raise ValueError(f"latents must be [B, T', H', W', C={self.in_channels}] "
                             f"(config.model.in_channels), got shape {tuple(latents.shape)}")
        b = latents.shape[0]
        grid = patches.grid_shape(latents.shape[1:], self.patch_size)
        tokens = patches.patchify_batch(latents, self.patch_size)
        n = tokens.shape[1]
        if jnp.shape(timesteps) == (1,):  # one timestep for the batch, as diffusers broadcasts
            timesteps = jnp.broadcast_to(timesteps, (b,))
        if jnp.shape(timesteps) not in ((b,), (b, n)):
            raise ValueError(f"timesteps must be [B={b}] or per token [B={b}, N={n}], got shape "
                             f"{jnp.shape(timesteps)}")
        per_token = jnp.ndim(timesteps) == 2
        timesteps = jnp.reshape(timesteps, (b, n if per_token else 1))
        time_ids = jnp.broadcast_to(jnp.arange(1, n + 1), (b, n)) if per_token else None
        positions = jnp.broadcast_to(jnp.asarray(patches.grid_positions(grid)), (b, n, 3))
        ones = lambda length: jnp.ones((b, length), jnp.int32)
        if micro is not None:
            micro_lib.check_values(self.micro_conditioning, micro, (b,))
            micro = {k: jnp.broadcast_to(jnp.reshape(v, (b, 1)), timesteps.shape)
                     for k, v in micro.items()}
        out = self.packed(tokens, positions, ones(n), timesteps, context, ones(context.shape[1]),
                          image_context=image_context, micro=micro, time_ids=time_ids)
        return patches.unpatchify_batch(out, grid, self.patch_size)

    def packed(self, tokens, positions, segment_ids, timesteps, context, context_segment_ids,
               image_context=None, image_segment_ids=None, micro=None, time_ids=None):
        """Packed call; shapes in the module docstring. Returns `[B, S, pt*ph*pw*C_out]`."""
        check_packed(self, tokens, positions, segment_ids, timesteps, context, context_segment_ids,
                     time_ids)
        image = self._image_tokens(image_context, image_segment_ids, tokens.shape[0])
        num_columns = timesteps.shape[1]
        ids = segment_ids if time_ids is None else time_ids
        seg_index = jnp.clip(ids - 1, 0, num_columns - 1)[:, :, None]  # each token's column

        x = self.patch_embedding(tokens).astype(jnp.float32)
        x = nn.with_logical_constraint(x, TOKENS)
        temb = self.time_embedder(timestep_features(timesteps, self.freq_dim))  # [B, K, D]
        if self.micro_conditioning:
            temb = temb + self._micro_embedding(micro, timesteps.shape)
        else:
            micro_lib.check_values((), micro, timesteps.shape)
        time_mod = self.time_proj(jax.nn.silu(temb))  # [B, K, 6, D]
        ctx = self.text_embedder(context.astype(self.dtype))
        ctx = nn.with_logical_constraint(
            ctx, ("activation_batch", "activation_text_length", "activation_embed"))
        rope = rope_cos_sin(positions, self.attention_head_dim, self.rope_max_seq_len)
        if image is not None and self.added_kv_proj_dim is None:  # image tokens join the text
            ctx = jnp.concatenate([image[0].astype(ctx.dtype), ctx], axis=1)
            context_segment_ids = jnp.concatenate([image[1], context_segment_ids], axis=1)
            image = None
        # Padding tokens ask for the first text token's segment, so no query row sees no key.
        cross_q_ids = jnp.where(segment_ids == 0, context_segment_ids[:, :1], segment_ids)

        x, _ = self.blocks(x, ctx, time_mod, seg_index, rope, segment_ids, cross_q_ids,
                           context_segment_ids, image)

        shift_scale = self.scale_shift_table + temb[:, :, None, :]  # [B, K, 2, D]
        take = lambda j: jnp.take_along_axis(shift_scale[:, :, j], seg_index, axis=1)
        x = modulate(layer_norm(x, self.eps), take(0), take(1)).astype(self.dtype)
        return self.proj_out(x).astype(jnp.float32)

    def _micro_embedding(self, micro, shape):
        """[B, K, D] from the per-segment values; zeros stand in while initialising."""
        if micro is None and self.is_initializing():
            micro = {name: jnp.zeros(shape) for name in self.micro_conditioning}
        micro_lib.check_values(self.micro_conditioning, micro, shape)
        return self.micro_embedder(micro)

    def _image_tokens(self, image_context, image_segment_ids, batch: int):
        """(embedded image tokens [B, N, D], ids [B, N]) for the blocks, or None (T2V)."""
        if not self.has_image_branch:
            if image_context is not None:
                raise ValueError("image_context was given but this model has no image branch "
                                 "(config.model.image_dim / added_kv_proj_dim are None)")
            return None
        shape = None if image_context is None else tuple(image_context.shape)
        n = self.pos_embed_seq_len or (shape[1] if shape and len(shape) == 3 else -1)
        if shape == (2 * batch, n // 2, self.image_dim) and self.pos_embed_seq_len and n % 2 == 0:
            # diffusers' FLF layout: first and last frame's tokens as rows 2b and 2b + 1
            image_context = jnp.reshape(image_context, (batch, n, self.image_dim))
            shape = (batch, n, self.image_dim)
        if shape != (batch, n, self.image_dim):
            raise ValueError(f"this image-conditioned model needs image_context [B={batch}, N, "
                             f"image_dim={self.image_dim}] (N = pos_embed_seq_len="
                             f"{self.pos_embed_seq_len} when set), got {shape}")
        if image_segment_ids is None:
            image_segment_ids = jnp.ones(image_context.shape[:2], jnp.int32)
        elif tuple(image_segment_ids.shape) != tuple(image_context.shape[:2]):
            raise ValueError(f"image_segment_ids has shape {tuple(image_segment_ids.shape)}, "
                             f"expected {tuple(image_context.shape[:2])}")
        tokens = self.image_embedder(image_context.astype(jnp.float32)).astype(self.dtype)
        tokens = nn.with_logical_constraint(
            tokens, ("activation_batch", "activation_text_length", "activation_embed"))
        return tokens, image_segment_ids


class ImageEmbedder(nn.Module):
    """Wan's image-token projection: [pos_embed +] LayerNorm -> Linear, GELU, Linear ->
    LayerNorm (both norms affine, eps 1e-5, in float32), `[B, N, image_dim]` -> `[B, N, dim]`."""

    dim: int
    pos_embed_seq_len: int | None = None
    eps: float = 1e-5  # torch.nn.LayerNorm's default, which diffusers' FP32LayerNorm keeps
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        if self.pos_embed_seq_len:
            pos = self.param("pos_embed", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (None, "text_embed")),
                (self.pos_embed_seq_len, d_in), jnp.float32)
            x = x + pos
        h = LayerNorm(self.eps, name="norm1")(x).astype(self.dtype)
        h = MLP(d_in, self.dim, "text_embed", "mlp", "embed", "gelu", dtype=self.dtype,
                name="ff")(h)
        return LayerNorm(self.eps, name="norm2")(h.astype(jnp.float32))


_COUNTS = ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim",
           "ffn_dim", "num_layers", "rope_max_seq_len")
_OPTIONAL_COUNTS = ("out_channels", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


def _is_count(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _check_types(m: WanDiT) -> None:
    """Config values of the wrong type (e.g. "2" in a hand-edited config.json) named by key."""
    for name in _COUNTS + _OPTIONAL_COUNTS:
        value = getattr(m, name)
        if not (_is_count(value) or (value is None and name in _OPTIONAL_COUNTS)):
            raise ValueError(f"model config {name}={value!r}: expected an int >= 1"
                             + (" or null" if name in _OPTIONAL_COUNTS else ""))
    if not isinstance(m.eps, (float, int, np.floating)) or isinstance(m.eps, bool) or not m.eps > 0:
        raise ValueError(f"model config eps={m.eps!r}: expected a number > 0")
    if not isinstance(m.cross_attn_norm, (bool, np.bool_)):
        raise ValueError(f"model config cross_attn_norm={m.cross_attn_norm!r}: expected true/false")
    if len(m.patch_size) != 3 or not all(_is_count(p) for p in m.patch_size):
        raise ValueError(f"model config patch_size={m.patch_size!r}: expected (pt, ph, pw), "
                         "ints >= 1")


def _check_supported(m: WanDiT) -> None:
    _check_types(m)
    if m.added_kv_proj_dim is not None and m.image_dim is None:
        raise ValueError(f"added_kv_proj_dim={m.added_kv_proj_dim} needs image_dim (the image "
                         "tokens its k/v projections read); text-to-video models set neither")
    if m.added_kv_proj_dim is not None and m.added_kv_proj_dim != m.inner_dim:
        raise ValueError(f"added_kv_proj_dim={m.added_kv_proj_dim} must equal the model width "
                         f"num_attention_heads * attention_head_dim = {m.inner_dim} (the image "
                         "k/v projections read the embedded image tokens)")
    if m.pos_embed_seq_len and m.image_dim is None:
        raise ValueError(f"pos_embed_seq_len={m.pos_embed_seq_len} needs image_dim (it is the "
                         "image tokens' position table)")


def check_packed(m: WanDiT, tokens, positions, segment_ids, timesteps, context,
                 context_segment_ids, time_ids=None) -> None:
    """Shape checks always; value checks (RoPE range, text per segment) when inputs are concrete."""
    b, s = tokens.shape[:2]
    length = context.shape[1] if context.ndim == 3 else "L"  # a wrong rank is named, not guessed
    want = {"tokens": (tokens, (b, s, m.token_in_dim)), "positions": (positions, (b, s, 3)),
            "segment_ids": (segment_ids, (b, s)),
            "context": (context, (b, length, m.text_dim)),
            "context_segment_ids": (context_segment_ids, (b, length))}
    for name, (arr, shape) in want.items():
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {shape} (tokens "
                             f"[B, S, pt*ph*pw*in_channels={m.token_in_dim}], context "
                             f"[B, L, text_dim={m.text_dim}])")
    if timesteps.ndim != 2 or timesteps.shape[0] != b:
        raise ValueError(f"timesteps must be [B={b}, K] (one per segment), got {timesteps.shape}")
    pos, seg, ctx_seg = (concrete_value(a) for a in (positions, segment_ids, context_segment_ids))
    if pos is not None and pos.size and (pos.min() < 0 or pos.max() >= m.rope_max_seq_len):
        raise ValueError(f"positions span [{pos.min()}, {pos.max()}], outside the RoPE range "
                         f"[0, rope_max_seq_len={m.rope_max_seq_len})")
    if time_ids is not None:
        if tuple(time_ids.shape) != (b, s):
            raise ValueError(f"time_ids has shape {tuple(time_ids.shape)}, expected {(b, s)}")
        ids = concrete_value(time_ids)
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() > timesteps.shape[1]):
            raise ValueError(f"time_ids span [{ids.min()}, {ids.max()}] but timesteps has "
                             f"K={timesteps.shape[1]} columns: ids must lie in 0..K")
    if seg is not None and ctx_seg is not None:
        _check_segments(seg, ctx_seg, timesteps.shape[1])


def _check_segments(seg: np.ndarray, ctx_seg: np.ndarray, num_segments: int) -> None:
    if seg.min(initial=0) < 0 or seg.max(initial=0) > num_segments:
        raise ValueError(f"segment_ids span [{seg.min()}, {seg.max()}] but timesteps has "
                         f"K={num_segments} columns: ids must lie in 0..K")
    for row in range(seg.shape[0]):
        missing = sorted(set(seg[row].tolist()) - set(ctx_seg[row].tolist()) - {0})
        if missing:
            raise ValueError(f"row {row}: segments {missing} have tokens but no text tokens with "
                             "the same id in context_segment_ids (every segment needs its text)")


def build_dit(model_config) -> WanDiT:
    """A WanDiT from `config.model` (diffusers names + VDIT_KEYS); unknown keys fail."""
    cfg = dict(model_config)
    fields = set(WanDiT.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"config.model has unknown keys {unknown}; known: {sorted(fields)}")
    if "dtype" in cfg:
        cfg["dtype"] = jnp.dtype(cfg["dtype"])
    if "matmul_dtype" in cfg:  # "" = the compute dtype
        cfg["matmul_dtype"] = jnp.dtype(cfg["matmul_dtype"]) if cfg["matmul_dtype"] else None
    if "patch_size" in cfg:
        cfg["patch_size"] = tuple(int(p) for p in cfg["patch_size"])
    if "micro_conditioning" in cfg:
        cfg["micro_conditioning"] = micro_lib.check_names(cfg["micro_conditioning"] or ())
    model = WanDiT(**cfg)
    _check_supported(model)
    if model.num_attention_heads < 1 or model.attention_head_dim < 2 or model.num_layers < 1:
        raise ValueError("config.model: num_attention_heads, attention_head_dim and num_layers "
                         f"must be positive, got {model.num_attention_heads}, "
                         f"{model.attention_head_dim}, {model.num_layers}")
    return model


def param_count(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
