"""CLIP vision encoder for image-to-video models that use one (Wan2.1 I2V's image branch).

Numerics of transformers' `CLIPVisionModel` (and `...WithProjection`) on the same weights:
  patches of `pixels [B, H, W, C]` (channels last, already CLIP-normalised; see
  `vdit.models.image_preprocess`) -> linear patch embedding (the reference's stride-p conv, no bias)
  -> class token prepended -> + learned position table -> pre-LayerNorm -> `num_hidden_layers`
  pre-norm encoder layers (x += Attn(LN(x)); x += MLP(LN(x)), MLP activation `hidden_act`)
  -> `last_hidden_state`; the class token's final state -> post-LayerNorm -> `pooler_output`
  (-> a bias-free `visual_projection` -> `image_embeds` when `projection_dim` is set).

`hidden_states` is one stacked array `[num_hidden_layers + 1, B, S, D]`: index 0 is the
pre-LayerNorm output, index i the output of layer i, exactly transformers' tuple order, so
`out.hidden_states[-2]` is the penultimate layer that Wan2.1 I2V conditions on. Layers are stacked
with `nn.scan` (params carry a leading `layers` axis); the residual stream is float32 and matmuls
run in the compute `dtype`. Only the trained resolution `image_size` is accepted (the reference's
`interpolate_pos_encoding` is not implemented).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import einops
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vdit.models.attention import attention as attend
from vdit.models.layers import HF_ACTIVATIONS, Dense, LayerNorm

# transformers' CLIPVisionConfig names; a mapping with these keys builds the module.
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "image_size", "patch_size", "num_channels", "hidden_act", "layer_norm_eps")
_OPTIONAL = {"num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
ACTIVATIONS = HF_ACTIVATIONS
# The token axis stays whole: CLIP sequences are short and odd-sized (1 + patches).
TOKENS = ("activation_batch", None, "activation_embed")
HEADS = ("activation_batch", None, "activation_heads", None)


@flax.struct.dataclass
class VisionOutput:
    """What the encoder returns; field names follow transformers' output classes."""

    last_hidden_state: jax.Array  # [B, S, D], S = 1 + (image_size // patch_size) ** 2
    pooler_output: jax.Array  # [B, D]
    hidden_states: jax.Array | None  # [num_hidden_layers + 1, B, S, D] or None
    image_embeds: jax.Array | None  # [B, projection_dim] or None


class EncoderLayer(nn.Module):
    """One pre-norm layer; called by `nn.scan` as `(x, x_or_None) = layer(x, segment_ids)`."""

    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    attention: str
    collect: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, segment_ids):
        d = x.shape[-1]
        head_dim = d // self.heads
        proj = lambda name: Dense((self.heads, head_dim), ("embed", "heads", "kv"), ("heads", "kv"),
                                  dtype=self.dtype, name=name)
        h = LayerNorm(self.eps, name="layer_norm1")(x).astype(self.dtype)
        q, k, v = (nn.with_logical_constraint(proj(n)(h), HEADS)
                   for n in ("q_proj", "k_proj", "v_proj"))
        h = attend(q, k, v, segment_ids, segment_ids, backend=self.attention)
        h = Dense((d,), ("heads", "kv", "embed"), ("embed",), in_dims=2, dtype=self.dtype,
                  name="out_proj")(nn.with_logical_constraint(h, HEADS))
        x = nn.with_logical_constraint(x + h.astype(jnp.float32), TOKENS)

        h = LayerNorm(self.eps, name="layer_norm2")(x).astype(self.dtype)
        h = Dense((self.intermediate_size,), ("embed", "mlp"), ("mlp",), dtype=self.dtype,
                  name="fc1")(h)
        h = ACTIVATIONS[self.hidden_act](
            nn.with_logical_constraint(h, ("activation_batch", None, "activation_mlp")))
        h = Dense((d,), ("mlp", "embed"), ("embed",), dtype=self.dtype, name="fc2")(h)
        x = nn.with_logical_constraint(x + h.astype(jnp.float32), TOKENS)
        return x, (x if self.collect else None)


class CLIPVisionEncoder(nn.Module):
    """`apply({"params": p}, pixels [B, H, W, C], output_hidden_states=True) -> VisionOutput`.

    Fields are transformers' CLIPVisionConfig names; `projection_dim=None` is `CLIPVisionModel`
    (no `image_embeds`), an int adds `CLIPVisionModelWithProjection`'s projection. `attention`
    is a backend of `vdit.models.attention` ("xla", "cudnn", "splash", "block_sparse", "auto"); `dtype` is the
    compute dtype (params and outputs are float32).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    attention: str = "xla"
    dtype: Any = jnp.float32

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @nn.compact
    def __call__(self, pixels, output_hidden_states: bool = True) -> VisionOutput:
        check_config({f: getattr(self, f) for f in CONFIG_FIELDS + ("projection_dim",)},
                     "CLIPVisionEncoder")
        self._check_pixels(pixels)
        x = nn.with_logical_constraint(self._embed(pixels), TOKENS)
        x = LayerNorm(self.layer_norm_eps, name="pre_layernorm")(x)
        segment_ids = jnp.ones(x.shape[:2], jnp.int32)  # one image per row: attend to all
        layers = nn.scan(
            EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast,), length=self.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})
        last, per_layer = layers(self.num_attention_heads, self.intermediate_size, self.hidden_act,
                                 self.layer_norm_eps, self.attention, output_hidden_states,
                                 self.dtype, name="layers")(x, segment_ids)
        pooled = LayerNorm(self.layer_norm_eps, name="post_layernorm")(last[:, 0])
        embeds = None
        if self.projection_dim is not None:
            embeds = Dense((self.projection_dim,), ("embed", None), (None,), use_bias=False,
                           dtype=self.dtype, name="visual_projection")(pooled)
            embeds = embeds.astype(jnp.float32)
        hidden = jnp.concatenate([x[None], per_layer]) if output_hidden_states else None
        return VisionOutput(last, pooled, hidden, embeds)

    def _embed(self, pixels):
        """`[B, H, W, C]` -> `[B, 1 + N, D]`: patch embedding, class token, positions."""
        b, p, d = pixels.shape[0], self.patch_size, self.hidden_size
        g = self.image_size // p
        # a size the patch does not divide loses its last pixels, as the strided conv drops them
        patches = einops.rearrange(pixels[:, :g * p, :g * p], "b (gh ph) (gw pw) c -> b gh gw ph pw c",
                                   ph=p, pw=p)
        tokens = Dense((d,), (None, None, "patch_in", "embed"), ("embed",), in_dims=3,
                       use_bias=False, dtype=self.dtype, name="patch_embedding")(patches)
        tokens = tokens.reshape(b, g * g, d).astype(jnp.float32)
        cls = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(d ** -0.5), ("embed",)), (d,), jnp.float32)
        pos = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (self.num_positions, d), jnp.float32)
        cls = jnp.broadcast_to(cls, (b, 1, d))
        return jnp.concatenate([cls, tokens], axis=1) + pos[None]

    def _check_pixels(self, pixels) -> None:
        want = (self.image_size, self.image_size, self.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(
                f"CLIP vision encoder expects pixels [B, {want[0]}, {want[1]}, {want[2]}] "
                f"(channels last, image_size={self.image_size}), got shape {tuple(pixels.shape)}; "
                "resize/crop with vdit.models.image_preprocess.preprocess first")
        if not jnp.issubdtype(pixels.dtype, jnp.floating):
            raise ValueError(f"CLIP vision encoder expects float pixels normalised with the CLIP "
                             f"mean/std, got dtype {pixels.dtype}; see image_preprocess.preprocess")


def check_config(values: Mapping, where: str) -> None:
    """Raises naming `where` and the key for impossible CLIPVisionConfig values."""
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "image_size", "patch_size", "num_channels"):
        if int(values[field]) <= 0:
            raise ValueError(f"{where}: {field}={values[field]!r}, expected > 0")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(f"{where}: hidden_size={values['hidden_size']} is not divisible by "
                         f"num_attention_heads={values['num_attention_heads']}")
    if values["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act={values['hidden_act']!r} is not one of "
                         f"{sorted(ACTIVATIONS)}")
    proj = values.get("projection_dim")
    if proj is not None and int(proj) <= 0:
        raise ValueError(f"{where}: projection_dim={proj!r}, expected > 0 or None")


def encoder_from_dict(cfg: Mapping, dtype="float32", where: str = "image encoder config",
                      **overrides) -> CLIPVisionEncoder:
    """Builds the module from CLIPVisionConfig names (plus optional `projection_dim`,
    `attention`); `overrides` win over `cfg`. Errors name `where` and the key."""
    values = {}
    for field in CONFIG_FIELDS + ("projection_dim", "attention"):
        if field in overrides:
            values[field] = overrides[field]
        elif field in cfg:
            values[field] = cfg[field]
        elif field in _OPTIONAL:
            values[field] = _OPTIONAL[field]
        elif field not in ("projection_dim", "attention"):
            raise ValueError(f"{where} lacks {field!r} (CLIPVisionConfig name); has {sorted(cfg)}")
    check_config(values, where)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{where}: dtype={dtype!r} is not a dtype ({e})") from e
    ints = {f: int(values[f]) for f in CONFIG_FIELDS if f not in ("hidden_act", "layer_norm_eps")}
    if values.get("projection_dim") is not None:
        ints["projection_dim"] = int(values["projection_dim"])
    ints["layer_norm_eps"] = float(values["layer_norm_eps"])
    return CLIPVisionEncoder(**(values | ints), dtype=dtype)


@functools.partial(jax.jit, static_argnums=0)
def penultimate_features(module: CLIPVisionEncoder, params, pixels) -> jax.Array:
    """Wan2.1 I2V's image conditioning: `hidden_states[-2]`, `[B, S, D]` float32 (jitted)."""
    out = module.apply({"params": params}, pixels, output_hidden_states=True)
    return out.hidden_states[-2]
