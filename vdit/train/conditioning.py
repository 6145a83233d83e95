"""Training-side conditioning: image-to-video segments mixed into DiT training, and the
micro-conditioning values handed to the model.

An I2V-capable DiT (Wan2.1's layout: in_channels = 2 z + tf, out_channels = z) reads, per patch,
`[noisy latents (z) | mask (tf) | condition latents (z)]`. A fraction `config.train.i2v_rate` of the
segments of a batch (drawn independently per segment and step) gets its clip's first-frame
condition (`cond_tokens`, see `vdit/data/conditions.py`); every other segment gets mask 0 and
condition 0. That all-zero condition is vdit's convention for text-to-video on an I2V-capable
model, and `Generator` feeds it when no image is given. Single-latent-frame segments (images) are
never conditioned: their condition is the answer itself, so it would only teach copying (the rate
applies to the videos). Of the conditioned segments, a fraction
`config.train.last_frame_rate` is given the first and the last frame (keyframe interpolation; the
pipeline draws which condition a clip carries). The loss stays on the z output channels.

Wan2.2 TI2V (`config.sample.expand_timesteps` on a DiT without condition channels) conditions
differently, as diffusers' TI2V pipeline samples: a fraction `train.i2v_rate` of the videos get
their first latent frame as it is (clean: with Wan's causal VAE it is the image's own latent), its
tokens at timestep 0 and out of the loss (`clean_first_frame_inputs`); the other segments of the
same rows train as text-to-video. The DiT's packed call takes a timestep per token through
`time_ids`: columns 1..K the segments' times, K+1..2K zero for their clean first frames.

Tokens list their features (pt, ph, pw, C) with channels fastest, so the model input is built per
patch position: [..., P*z] and [..., P*(tf+z)] are viewed as [..., P, C] and joined along C, which
equals patchifying the channel-concatenated latents (tests check it).

An image-branch DiT (Wan2.1 I2V: `model.image_dim`) also reads each segment's first-frame CLIP
tokens (`image_context`, packed by the pipeline). A segment sees them exactly when it sees its
condition latents (the same per-segment draw); every other segment, and every segment of a run
with i2v_rate 0, gets zero tokens. Wan2.1 I2V trains every clip image-conditioned (i2v_rate 1.0),
where this changes nothing; below 1.0, keeping the tokens would hand a "text-to-video" segment its
first frame's content through the image branch, so it would never learn to go without, and zeros
(like the zero condition latents) are the null image it is then sampled with.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vdit.config import ConfigError
from vdit.data import image_tokens
from vdit.data.conditions import COND_KEY, COND_KEY_LAST, COND_TOKENS, MICRO_PREFIX
from vdit.diffusion import flow


def condition_channels(dit) -> int:
    """Extra input channels (mask + condition latents) of the DiT: in_channels - out_channels."""
    return dit.in_channels - (dit.out_channels or dit.in_channels)


def i2v_rate(config) -> float:
    return float(config.train.get("i2v_rate", 0.0))


def uses_condition(config, dit) -> bool:
    """True when batches carry `cond_tokens`: some segments train as I2V."""
    return i2v_rate(config) > 0 and condition_channels(dit) > 0


def expand_timesteps(config) -> bool:
    """The run's model takes a clean image latent as frame 0 at timestep 0 (Wan2.2 TI2V)."""
    return "sample" in config and bool(config.sample.get("expand_timesteps", False))


def clean_first_frame(config, dit) -> bool:
    """True when training gives some videos a clean first frame (TI2V image-to-video)."""
    return expand_timesteps(config) and condition_channels(dit) == 0 and i2v_rate(config) > 0


def check_config(config, dit) -> None:
    """Start-up checks for I2V training; errors name the config keys."""
    check_image_config(config, dit)
    rate = i2v_rate(config)
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"config key 'train.i2v_rate' = {rate}; expected a fraction in [0, 1]")
    last = float(config.train.get("last_frame_rate", 0.0))
    if not 0.0 <= last <= 1.0:
        raise ConfigError(f"config key 'train.last_frame_rate' = {last}; expected a fraction in "
                          "[0, 1]")
    extra = condition_channels(dit)
    z = dit.out_channels or dit.in_channels
    tf = _temporal_factor(config)
    if extra not in (0, tf + z):
        raise ConfigError(f"config keys 'model.in_channels' = {dit.in_channels} and "
                          f"'model.out_channels' = {z}: the DiT takes {extra} extra input channels; "
                          f"expected 0 (text-to-video) or {tf} mask + {z} condition channels "
                          f"(Wan I2V: in_channels = 2 * out_channels + {tf})")
    if rate > 0 and extra == 0 and not expand_timesteps(config):
        raise ConfigError(f"config key 'train.i2v_rate' = {rate} trains image-to-video, which "
                          f"needs 'model.in_channels' = 2 * z + {tf} = {2 * z + tf} (noisy latents, "
                          f"mask, condition latents; z = 'model.out_channels' = {z}), got "
                          f"{dit.in_channels}, or 'sample.expand_timesteps' = True (Wan2.2 TI2V: "
                          "a clean first latent frame)")
    if clean_first_frame(config, dit) and dit.patch_size[0] != 1:
        raise ConfigError(f"config key 'model.patch_size' = {tuple(dit.patch_size)}: TI2V "
                          "training (sample.expand_timesteps) needs a temporal patch of 1, so "
                          "that the first latent frame's tokens are its own")


def _temporal_factor(config) -> int:
    """Pixel frames per latent frame of the run's VAE (Wan: 4)."""
    if "vae" in config and "temperal_downsample" in config.vae:
        return 2 ** sum(bool(d) for d in config.vae.temperal_downsample)
    return 4


def interleave(tokens: jax.Array, cond: jax.Array, patch_volume: int) -> jax.Array:
    """tokens [..., P*a] and cond [..., P*b] -> [..., P*(a+b)]: per patch position, a then b."""
    lead = tokens.shape[:-1]
    a, b = tokens.shape[-1] // patch_volume, cond.shape[-1] // patch_volume
    joined = jnp.concatenate([tokens.reshape(*lead, patch_volume, a),
                              cond.astype(tokens.dtype).reshape(*lead, patch_volume, b)], -1)
    return joined.reshape(*lead, patch_volume * (a + b))


def draw_i2v(rng: jax.Array, shape: tuple[int, int], rate: float) -> jax.Array:
    """[B, K] float 1.0 where a segment trains as image-to-video (probability `rate`)."""
    return (jax.random.uniform(rng, shape) < rate).astype(jnp.float32)


def i2v_flags(dit, batch: dict, rng: jax.Array, rate: float, num_segments: int) -> jax.Array:
    """[B, K] float 1.0 where segment k trains image-to-video: drawn at `rate` from `rng` (a pure
    function of it, so `model_input` and `image_kwargs` agree), never for single-latent-frame
    segments; all zero without `cond_tokens` in the batch or with `rate` 0."""
    seg = batch["segment_ids"]
    if COND_TOKENS not in batch or rate <= 0:
        return jnp.zeros((seg.shape[0], num_segments), jnp.float32)
    if dit.patch_size[0] == 1:  # a token's t position is then its latent frame
        return first_frame_flags(batch, rng, rate, num_segments)
    return draw_i2v(rng, (seg.shape[0], num_segments), rate)


def model_input(dit, x_t: jax.Array, batch: dict, rng: jax.Array, rate: float,
                num_segments: int) -> jax.Array:
    """Noisy tokens [B, S, P*z] -> the DiT's input tokens [B, S, P*in_channels].

    T2V models take x_t as it is. I2V-capable ones get each segment's condition (drawn at
    `rate`, `i2v_flags`) or zeros; without `cond_tokens` in the batch every segment is
    text-to-video."""
    extra = condition_channels(dit)
    if not extra:
        return x_t
    p = math.prod(dit.patch_size)
    if COND_TOKENS in batch and rate > 0:
        flags = i2v_flags(dit, batch, rng, rate, num_segments)
        cond = batch[COND_TOKENS] * flow.per_token(flags, batch["segment_ids"])[..., None]
    else:
        cond = jnp.zeros(x_t.shape[:-1] + (p * extra,), x_t.dtype)
    return interleave(x_t, cond, p)


def first_frame_flags(batch: dict, rng: jax.Array, rate: float, num_segments: int) -> jax.Array:
    """[B, K] 1.0 for the segments drawn (at `rate`) to train as image-to-video, among those with
    tokens past latent frame 0 (videos, not images); positions' t is the latent frame (pt = 1)."""
    seg = batch["segment_ids"]
    flags = draw_i2v(rng, (seg.shape[0], num_segments), rate)
    later = jnp.where(batch["positions"][..., 0] > 0, seg, 0)  # videos' tokens past frame 0
    return flags * (flow.segment_token_counts(later, num_segments) > 0)


def clean_first_frame_inputs(x0: jax.Array, x_t: jax.Array, timesteps: jax.Array, batch: dict,
                             flags: jax.Array, micro: dict):
    """TI2V inputs of the packed call: x0, x_t [B, S, D]; timesteps [B, K] (0..1000) per segment;
    flags [B, K] (`first_frame_flags`); micro = `micro_kwargs(...)`.

    Returns (tokens [B, S, D]: x0 on the flagged segments' frame-0 tokens, else x_t;
    timesteps [B, 2K]: the segments' then zeros; call keywords {"time_ids" [B, S], micro with
    its columns doubled like the timesteps}; loss mask [B, S]: 0 on those clean tokens)."""
    seg, k = batch["segment_ids"], timesteps.shape[1]
    clean = (batch["positions"][..., 0] == 0) & (seg > 0) & (flow.per_token(flags, seg) > 0)
    tokens = jnp.where(clean[..., None], x0, x_t)
    columns = jnp.concatenate([timesteps, jnp.zeros_like(timesteps)], axis=-1)
    kwargs = {"time_ids": seg + k * clean.astype(seg.dtype)}
    if "micro" in micro:
        kwargs["micro"] = {n: jnp.concatenate([v, v], -1) for n, v in micro["micro"].items()}
    return tokens, columns, kwargs, 1.0 - clean.astype(jnp.float32)


IMAGE_CONTEXT, IMAGE_SEGMENT_IDS = image_tokens.IMAGE_CONTEXT, image_tokens.IMAGE_SEGMENT_IDS


def image_tokens_per_row(config) -> int:
    """CLIP tokens a packed row carries for an image-branch DiT: one image's class + patch tokens
    (`config.image_encoder`: 1 + (image_size / patch_size)^2) per segment."""
    if "image_encoder" not in config:
        raise ConfigError("config.model.image_dim is set (a Wan2.1 I2V image branch) but the "
                          "config has no 'image_encoder' section (the CLIP tower whose tokens it "
                          "reads)")
    return image_tokens.tokens_per_image(config.image_encoder) * int(config.data.max_segments)


def image_record_shape(config, dit) -> tuple[int, int] | None:
    """(N, image_dim) of one clip's first-frame CLIP tokens that the pipeline packs for an
    image-branch DiT; None for a DiT without one."""
    if not dit.has_image_branch:
        return None
    per_row = image_tokens_per_row(config)
    return per_row // int(config.data.max_segments), int(dit.image_dim)


def check_image_config(config, dit) -> None:
    """Start-up checks for training an image branch; errors name the config keys."""
    if not dit.has_image_branch:
        return
    image_tokens_per_row(config)  # the image_encoder section is there
    if dit.pos_embed_seq_len:
        raise ConfigError(f"config key 'model.pos_embed_seq_len' = {dit.pos_embed_seq_len}: a "
                          "first-last-frame image branch (Wan2.1 FLF2V) reads two images' CLIP "
                          "tokens, but the latent shards hold the first frame's only; train it "
                          "with pos_embed_seq_len unset (Wan2.1 I2V)")
    width = int(config.image_encoder.get("hidden_size", dit.image_dim))
    if width != dit.image_dim:
        raise ConfigError(f"config key 'image_encoder.hidden_size' = {width} but 'model.image_dim'"
                          f" = {dit.image_dim}: the image branch reads the CLIP tower's hidden "
                          "states, so they must be equal")


def image_kwargs(dit, batch: dict, rng: jax.Array | None = None, rate: float = 0.0,
                 num_segments: int = 1) -> dict:
    """The packed call's image keywords for an image-branch DiT (Wan2.1 I2V): the row's CLIP
    tokens `image_context [B, N, image_dim]` and their segment ids `[B, N]`; {} otherwise. With
    `rng`, the tokens of segments that `i2v_flags(rng, rate)` leaves text-to-video are zeroed (see
    the module doc); without it they are passed as they are."""
    if not dit.has_image_branch:
        return {}
    image, ids = batch[IMAGE_CONTEXT], batch[IMAGE_SEGMENT_IDS]
    if rng is not None:
        flags = i2v_flags(dit, batch, rng, rate, num_segments)
        image = image * (flow.per_token(flags, ids) * (ids > 0))[..., None]
    return {"image_context": image, "image_segment_ids": ids}


def record_keys(config, dit) -> dict[str, str]:
    """{latent record key: what needs it, and the encode setting that writes it} for this run's
    conditioning (a start-up check names the shard that lacks one)."""
    keys = {}
    if uses_condition(config, dit):
        keys[COND_KEY] = ("config.train.i2v_rate > 0 (encode with "
                          "config.encode.i2v_condition=True)")
        if float(config.train.get("last_frame_rate", 0.0)) > 0:
            keys[COND_KEY_LAST] = ("config.train.last_frame_rate > 0 (encode with "
                                   "config.encode.last_frame_condition=True)")
    if dit.has_image_branch:
        keys[image_tokens.RECORD_KEY] = ("the DiT's image branch, config.model.image_dim (encode "
                                         "with `vdit encode` and this config: its image_encoder "
                                         "section gives the CLIP tower)")
    return keys


def micro_kwargs(dit, batch: dict) -> dict:
    """The packed call's `micro` keyword: {name: [B, K]} from the batch, or {} (none)."""
    if not dit.micro_conditioning:
        return {}
    return {"micro": {name: batch[MICRO_PREFIX + name] for name in dit.micro_conditioning}}
