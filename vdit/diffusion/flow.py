"""Flow matching (rectified flow) as Wan2.1 trains it, over packed rows of spacetime tokens.

Conventions: t in [0, 1], t = 0 is data and t = 1 is noise; x_t = (1 - t) x0 + t eps; the model
predicts the velocity v = eps - x0 and receives the timestep as 1000 t (Wan's [0, 1000) range).
In a packed row every segment (video) has its own t, shifted by its own resolution: more tokens
mean more redundancy, so noise must go higher to destroy the signal (SD3's time-shift argument).

Config section `flow`: time_sampling ("uniform" | "logit_normal"), logit_mean, logit_std,
shift_mode ("fixed" | "resolution"), shift (the fixed shift, or the shift at base_tokens),
base_tokens (token count at which the resolution shift equals `shift`), max_shift (cap).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TIME_SAMPLINGS = ("uniform", "logit_normal")
SHIFT_MODES = ("fixed", "resolution")
NUM_TRAIN_TIMESTEPS = 1000.0


def sample_times(rng: jax.Array, shape: tuple[int, ...], cfg) -> jax.Array:
    """Draws unshifted t in (0, 1) of `shape` by the configured distribution."""
    if cfg.time_sampling == "uniform":
        return jax.random.uniform(rng, shape, minval=1e-5, maxval=1.0 - 1e-5)
    if cfg.time_sampling == "logit_normal":
        z = cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, shape)
        return jax.nn.sigmoid(z)
    raise ValueError(f"config key 'flow.time_sampling' = {cfg.time_sampling!r}; "
                     f"allowed: {list(TIME_SAMPLINGS)}")


def shift_times(t: jax.Array, shift: jax.Array | float) -> jax.Array:
    """The flow time shift: t' = s t / (1 + (s - 1) t); s > 1 pushes t towards noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(num_tokens: jax.Array, cfg) -> jax.Array:
    """Per-segment shift: fixed, or `shift * sqrt(tokens / base_tokens)` capped at max_shift."""
    num_tokens = jnp.asarray(num_tokens, jnp.float32)
    if cfg.shift_mode == "fixed":
        return jnp.full_like(num_tokens, cfg.shift)
    if cfg.shift_mode == "resolution":
        s = cfg.shift * jnp.sqrt(jnp.maximum(num_tokens, 1.0) / cfg.base_tokens)
        return jnp.clip(s, 1.0, cfg.max_shift)
    raise ValueError(f"config key 'flow.shift_mode' = {cfg.shift_mode!r}; allowed: {list(SHIFT_MODES)}")


def segment_token_counts(segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """segment_ids [B, S] (0 = padding) -> tokens per segment [B, K] for ids 1..K."""
    ids = jnp.arange(1, num_segments + 1)
    return jnp.sum(segment_ids[..., None] == ids, axis=-2)


def per_token(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """values [B, K] per segment -> [B, S] per token (padding tokens get segment 1's value)."""
    index = jnp.maximum(segment_ids - 1, 0)
    return jnp.take_along_axis(values, index, axis=-1)


def sample_segment_times(rng: jax.Array, segment_ids: jax.Array, num_segments: int, cfg):
    """Shifted t per segment [B, K], drawn independently for every segment of every row."""
    t = sample_times(rng, segment_ids.shape[:1] + (num_segments,), cfg)
    counts = segment_token_counts(segment_ids, num_segments)
    return shift_times(t, resolution_shift(counts, cfg))


def noisy_tokens(x0: jax.Array, noise: jax.Array, t_tokens: jax.Array) -> jax.Array:
    """x0, noise [B, S, D]; t_tokens [B, S] -> x_t = (1 - t) x0 + t noise."""
    t = t_tokens[..., None].astype(x0.dtype)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    return noise - x0


def packed_loss(pred: jax.Array, target: jax.Array, segment_ids: jax.Array, num_segments: int,
                loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """MSE averaged per segment, then over the segments present (padding excluded).

    pred, target [B, S, D]; segment_ids [B, S]; loss_mask [B, S] (1 = counts; e.g. 0 on a given
    image-to-video first frame). Returns (loss, per-segment losses [B, K]). A segment with no
    counted token does not take part in the mean.
    """
    per_tok = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), -1)
    weight = (segment_ids > 0).astype(jnp.float32)
    if loss_mask is not None:
        weight = weight * loss_mask.astype(jnp.float32)
    onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
    onehot = onehot * weight[..., None]                        # [B, S, K]
    seg_sum = jnp.einsum("bs,bsk->bk", per_tok, onehot)
    seg_count = jnp.sum(onehot, axis=1)
    present = seg_count > 0
    seg_loss = jnp.where(present, seg_sum / jnp.maximum(seg_count, 1.0), 0.0)
    loss = jnp.sum(seg_loss) / jnp.maximum(jnp.sum(present), 1)
    return loss, seg_loss
