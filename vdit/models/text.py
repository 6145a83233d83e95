"""Text encoders: the UMT5 encoder of Wan2.1 and its miniatures for the synthetic data.

One transformer serves every `config.text.kind`: "umt5" is transformers' `UMT5EncoderModel`
(numerics matched on the same weights); "byte" and "word" are the same architecture over a
258-token byte vocabulary or a configured word list, small enough to train alongside the DiT.
The architecture, per block:
  x += Attn(RMSNorm(x)) with an unscaled q·k plus a learned relative-position bias (one table per
  layer, the UMT5 difference from T5) and padded keys masked out; x += FFN(RMSNorm(x)) with a gated
  (or plain) activation; a final RMSNorm. Padded *query* positions are computed like the others
  (they attend to the real tokens), as the reference does.

`encode_prompts` reproduces Wan's prompt pipeline: clean, tokenize to the fixed length, encode, and
zero the embeddings past each prompt's true length.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.models.layers import HF_ACTIVATIONS, concrete_value
from vdit.models.tokenizers import ByteTokenizer, WordTokenizer, load_tokenizer, prompt_clean

# transformers' UMT5Config names; a config dict with these keys builds the module.
CONFIG_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance",
                 "feed_forward_proj", "layer_norm_epsilon")
_ACTIVATIONS = HF_ACTIVATIONS
_ACT = ("activation_batch", "activation_text_length", "activation_embed")
# Rows of a byte/word embedding table are padded to a multiple of this (see padded_vocab_size).
VOCAB_MULTIPLE = 128


def parse_feed_forward_proj(value: str) -> tuple[bool, str]:
    """'gated-gelu' -> (True, 'gelu_new') as transformers reads it; 'relu' -> (False, 'relu')."""
    parts = str(value).split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ValueError(f"feed_forward_proj={value!r}: expected 'ACT' or 'gated-ACT'")
    act = "gelu_new" if value == "gated-gelu" else parts[-1]
    if act not in _ACTIVATIONS:
        raise ValueError(f"feed_forward_proj={value!r}: activation {act!r} is not one of "
                         f"{sorted(_ACTIVATIONS)}")
    return gated, act


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[L, L] int32 bucket of (key - query) for a bidirectional encoder, T5's log-spaced scheme.

    Computed in float32 with the reference's operation order so boundaries land on the same
    bucket; the log itself is taken in float64 and rounded, as numpy's float32 log can be 1 ulp
    off. Where a distance's bucket position is exactly an integer (e.g. 38 buckets, max distance
    25) that last bit picks the bucket, and torch's float32 log itself differs between CPUs there,
    so such configs match transformers up to one bucket at those ties (UMT5's 32 / 128 exactly).
    A static table, as the length is static under jit.
    """
    pos = np.arange(length, dtype=np.int64)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    ratio = rel.astype(np.float32) / np.float32(max_exact)
    with np.errstate(divide="ignore"):
        log_ratio = np.log(ratio.astype(np.float64)).astype(np.float32)
    log_ratio = log_ratio / np.float32(math.log(max_distance / max_exact))
    log_ratio = log_ratio * np.float32(half - max_exact)
    large = max_exact + np.where(np.isfinite(log_ratio), log_ratio, 0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class _Proj(nn.Module):
    """Bias-free projection contracting x's axes `axis` with a kernel [*in, *features].

    Not nn.DenseGeneral: it creates its kernel flattened, which breaks the logical-axis sharding
    constraint flax applies to boxed parameters under a mesh."""

    features: tuple[int, ...]
    axis: tuple[int, ...]
    axes: tuple
    std: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        axis = tuple(a % x.ndim for a in self.axis)
        shape = tuple(x.shape[a] for a in axis) + self.features
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(self.std), self.axes), shape, jnp.float32)
        contract = (axis, tuple(range(len(axis))))
        return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                   (contract, ((), ())))


def _dense(features, axes, name, std, dtype, axis=-1):
    features = (features,) if isinstance(features, int) else tuple(features)
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return _Proj(features, axis, tuple(axes), std, dtype, name=name)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (scale * x32).astype(self.dtype)


class Attention(nn.Module):
    """Self-attention with an additive per-layer relative bias.

    `buckets` [L, L] (shared by all layers); `allowed` [B, Lq or 1, Lk] bool.
    """

    d_model: int
    d_kv: int
    num_heads: int
    num_buckets: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, buckets, allowed):
        d, h, k = self.d_model, self.num_heads, self.d_kv
        # Mesh-TensorFlow init scales: q absorbs the missing 1/sqrt(d_kv) of the dot product.
        q = _dense((h, k), ("embed", "heads", "kv"), "q", (d * k) ** -0.5, self.dtype)(x)
        kk = _dense((h, k), ("embed", "heads", "kv"), "k", d ** -0.5, self.dtype)(x)
        v = _dense((h, k), ("embed", "heads", "kv"), "v", d ** -0.5, self.dtype)(x)
        table = self.param(
            "relative_bias",
            nn.with_logical_partitioning(nn.initializers.normal(d ** -0.5), (None, "heads")),
            (self.num_buckets, h), jnp.float32)
        bias = jnp.transpose(table[buckets], (2, 0, 1))  # [H, Lq, Lk]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, kk, preferred_element_type=jnp.float32)
        scores = scores + bias[None]
        # The reference adds finfo.min at padded keys; replacing gives the same softmax, and a
        # row with no valid key becomes uniform in both.
        scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return _dense(d, ("heads", "kv", "embed"), "o", (h * k) ** -0.5, self.dtype,
                      axis=(-2, -1))(out)


class FeedForward(nn.Module):
    d_model: int
    d_ff: int
    feed_forward_proj: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        gated, act = parse_feed_forward_proj(self.feed_forward_proj)
        std_in = self.d_model ** -0.5
        if gated:
            hidden = _ACTIVATIONS[act](
                _dense(self.d_ff, ("embed", "mlp"), "wi_0", std_in, self.dtype)(x))
            hidden = hidden * _dense(self.d_ff, ("embed", "mlp"), "wi_1", std_in, self.dtype)(x)
        else:
            hidden = _ACTIVATIONS[act](
                _dense(self.d_ff, ("embed", "mlp"), "wi", std_in, self.dtype)(x))
        hidden = nn.with_logical_constraint(
            hidden, ("activation_batch", "activation_text_length", "activation_mlp"))
        return _dense(self.d_model, ("mlp", "embed"), "wo", self.d_ff ** -0.5, self.dtype)(hidden)


class Block(nn.Module):
    """One encoder layer; the residual stream stays float32 whatever the compute dtype."""

    cfg: dict

    @nn.compact
    def __call__(self, x, buckets, allowed):
        c, dtype = self.cfg, self.cfg["dtype"]
        y = RMSNorm(c["layer_norm_epsilon"], dtype, name="attn_norm")(x)
        x = x + Attention(c["d_model"], c["d_kv"], c["num_heads"],
                          c["relative_attention_num_buckets"], dtype, name="attn")(
            y, buckets, allowed).astype(jnp.float32)
        y = RMSNorm(c["layer_norm_epsilon"], dtype, name="ffn_norm")(x)
        x = x + FeedForward(c["d_model"], c["d_ff"], c["feed_forward_proj"], dtype,
                            name="ffn")(y).astype(jnp.float32)
        return nn.with_logical_constraint(x, _ACT), None


class UMT5Encoder(nn.Module):
    """`apply({"params": p}, token_ids [B, L] int, attention_mask [B, L] or None) -> [B, L, D]`.

    Field names are transformers' UMT5Config names; `dtype` is the compute dtype (params are
    float32). The output is float32. Layers are stacked with `nn.scan` (params carry a leading
    `layers` axis).
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, token_ids, attention_mask=None, segment_ids=None):
        """`segment_ids` [B, L] (optional) packs several texts in a row: a token attends only to
        its own segment's tokens, so each text encodes as it would alone."""
        allowed = _allowed_keys(token_ids, attention_mask, segment_ids)
        check_token_ids(token_ids, self.vocab_size)
        parse_feed_forward_proj(self.feed_forward_proj)
        buckets = jnp.asarray(relative_position_buckets(
            token_ids.shape[1], self.relative_attention_num_buckets,
            self.relative_attention_max_distance))
        embed = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                      ("vocab", "embed")),
            (self.vocab_size, self.d_model), jnp.float32)
        # float32 residual stream even from weights held in bfloat16 (`vdit sample --dtype`)
        x = nn.with_logical_constraint(jnp.take(embed, token_ids, axis=0).astype(jnp.float32),
                                       _ACT)
        cfg = {f: getattr(self, f) for f in CONFIG_FIELDS} | {"dtype": self.dtype}
        layers = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = layers(cfg, name="layers")(x, buckets, allowed)
        return RMSNorm(self.layer_norm_epsilon, jnp.float32, name="final_norm")(x)


def check_token_ids(token_ids, vocab_size: int, source: str = "", why: str = "") -> None:
    """Concrete ids outside [0, vocab_size) are an error: the embedding lookup would give NaN
    (too large) or wrap (negative), not fail. Traced ids are not checked."""
    ids = concrete_value(token_ids)
    bad = ids[(ids < 0) | (ids >= vocab_size)] if ids is not None and ids.size else ()
    if len(bad):
        raise ValueError(f"token id {int(bad[0])} {source}is outside the encoder's vocab "
                         f"[0, {vocab_size}){why}")


def _allowed_keys(token_ids, attention_mask, segment_ids):
    """[B, 1, L] key mask, or [B, L, L] when segments restrict each query to its own text."""
    if token_ids.ndim != 2 or not jnp.issubdtype(token_ids.dtype, jnp.integer):
        raise ValueError(f"token_ids must be an integer array [B, L], got shape "
                         f"{tuple(token_ids.shape)} dtype {token_ids.dtype}")
    for name, arr in (("attention_mask", attention_mask), ("segment_ids", segment_ids)):
        if arr is not None and tuple(arr.shape) != tuple(token_ids.shape):
            raise ValueError(f"{name} shape {tuple(arr.shape)} must equal token_ids shape "
                             f"{tuple(token_ids.shape)}")
    keys = (jnp.ones(token_ids.shape, bool) if attention_mask is None
            else jnp.asarray(attention_mask) > 0)
    if segment_ids is None:
        return keys[:, None, :]
    return keys[:, None, :] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def encoder_from_dict(cfg, dtype=jnp.float32, where: str = "text encoder config",
                      **overrides) -> UMT5Encoder:
    """Builds the module from a mapping with UMT5Config names; errors name `where` and the key."""
    values = {}
    for field in CONFIG_FIELDS:
        if field in overrides:
            values[field] = overrides[field]
        elif field in cfg:
            values[field] = cfg[field]
        elif field not in ("relative_attention_num_buckets", "relative_attention_max_distance",
                           "feed_forward_proj", "layer_norm_epsilon"):
            raise ValueError(f"{where} lacks {field!r} (UMT5Config name); has {sorted(cfg)}")
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        if int(values[field]) <= 0:
            raise ValueError(f"{where}: {field}={values[field]!r}, expected > 0")
    try:
        parse_feed_forward_proj(values.get("feed_forward_proj", "gated-gelu"))
        dtype = jnp.dtype(dtype)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from e
    return UMT5Encoder(**values, dtype=dtype)


def text_encoder_from_config(cfg_text):
    """`config.text` -> (module, tokenizer); tokenizer(texts) -> (ids [B, L], mask [B, L]).

    kind "byte": the byte tokenizer (no files), vocabulary fixed by it; kind "word": whole words
    from the list `config.text.vocab`; `max_length` from the config; for both the embedding table
    has `config.text.vocab_size` rows (default: the tokenizer's ids padded to a multiple of 128).
    kind "umt5": the tokenizer at `tokenizer_path`; parameters come from
    `vdit.convert.wan_text.load_text_encoder` (or `init` for a random start).
    """
    kind = cfg_text.get("kind", None)
    dtype = cfg_text.get("dtype", "float32")
    if "max_length" not in cfg_text:
        raise ValueError("config.text.max_length is required (the padded prompt length)")
    max_length = int(cfg_text["max_length"])
    if kind in ("byte", "word"):
        if kind == "byte":
            tokenizer = ByteTokenizer(max_length)
        elif not cfg_text.get("vocab", None):
            raise ValueError("config.text.vocab (a list of words) is required for kind 'word'")
        else:
            tokenizer = WordTokenizer(list(cfg_text["vocab"]), max_length)
        vocab = int(cfg_text.get("vocab_size", padded_vocab_size(tokenizer.vocab_size)))
        if vocab < tokenizer.vocab_size:
            raise ValueError(f"config.text.vocab_size={vocab} is smaller than the {kind} "
                             f"tokenizer's {tokenizer.vocab_size} ids")
        return encoder_from_dict(cfg_text, dtype, "config.text", vocab_size=vocab), tokenizer
    if kind == "umt5":
        if not cfg_text.get("tokenizer_path", None):
            raise ValueError("config.text.tokenizer_path is required for kind 'umt5' "
                             "(a folder with tokenizer.json or spiece.model)")
        tokenizer = load_tokenizer(cfg_text["tokenizer_path"], max_length)
        return encoder_from_dict(cfg_text, dtype, "config.text"), tokenizer
    raise ValueError(f"config.text.kind={kind!r}: expected 'byte', 'word' or 'umt5'")


def padded_vocab_size(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """`size` rounded up to a multiple of `multiple`: the embedding table's rows (the `vocab` axis)
    then split evenly over any tensor-parallel mesh axis up to that size; the extra ids are never
    produced by the tokenizer."""
    return -(-int(size) // multiple) * multiple


@functools.partial(jax.jit, static_argnums=0)
def _encode_padded(module, params, ids, mask):
    emb = module.apply({"params": params}, ids, mask)
    lengths = jnp.sum(mask > 0, axis=1)
    keep = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    return jnp.where(keep[..., None], emb, 0.0)


def encode_prompts(module, params, tokenizer, prompts: str | Sequence[str],
                   clean: bool = True) -> jax.Array:
    """Prompts -> [B, max_length, D], as Wan's pipeline does (diffusers `_get_t5_prompt_embeds`).

    Cleans each prompt (html unescape, whitespace), tokenizes with padding to the tokenizer's
    `max_length` (longer prompts are truncated with a warning), encodes with the mask, then sets
    the rows at and past each prompt's token count to zero. An empty prompt still has its EOS.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.200}")
    if clean:
        prompts = [prompt_clean(p) for p in prompts]
    ids, mask = tokenizer(prompts)
    check_token_ids(ids, module.vocab_size, "from the tokenizer ",
                    ": tokenizer and weights do not match")
    return _encode_padded(module, params, jnp.asarray(ids), jnp.asarray(mask))
