"""Flow matching (rectified flow) as Wan2.1 trains it, over packed rows of spacetime tokens.

Conventions: t in [0, 1], t = 0 is data and t = 1 is noise; x_t = (1 - t) x0 + t eps; the model
predicts the velocity v = eps - x0 and receives the timestep as 1000 t (Wan's [0, 1000) range).
In a packed row every segment (video) has its own t, shifted by its own resolution: more tokens
mean more redundancy, so noise must go higher to destroy the signal (SD3's time-shift argument).

Config section `flow`: time_sampling ("uniform" | "logit_normal"), logit_mean, logit_std,
shift_mode ("fixed" | "resolution"), shift (the fixed shift, or the shift at base_tokens),
base_tokens (token count at which the resolution shift equals `shift`), max_shift (cap).

A time range `(lo, hi)` restricts the shifted t to [lo, hi) (a Wan2.2 expert's share of the
timesteps): the unshifted draw comes from the configured distribution truncated to the preimage of
the range under the segment's shift (inverse-CDF sampling), so within the range t has the
density the unrestricted sampler gives it, renormalised.
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


def truncated_times(rng: jax.Array, shape: tuple[int, ...], cfg, lo: jax.Array,
                    hi: jax.Array) -> jax.Array:
    """Unshifted t of `shape` by the configured distribution, conditioned on lo <= t < hi
    (lo, hi broadcast to `shape`; 0 <= lo < hi <= 1)."""
    u = jax.random.uniform(rng, shape)
    if cfg.time_sampling == "uniform":
        eps = 1e-5
        lo, hi = jnp.maximum(lo, eps), jnp.minimum(hi, 1.0 - eps)
        return lo + (hi - lo) * u
    if cfg.time_sampling == "logit_normal":  # through the normal's CDF in logit space
        cdf = lambda t: jax.scipy.special.ndtr((jax.scipy.special.logit(t) - cfg.logit_mean)
                                               / cfg.logit_std)
        p = cdf(lo) + (cdf(hi) - cdf(lo)) * u
        return jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.scipy.special.ndtri(p))
    raise ValueError(f"config key 'flow.time_sampling' = {cfg.time_sampling!r}; "
                     f"allowed: {list(TIME_SAMPLINGS)}")


def shift_times(t: jax.Array, shift: jax.Array | float) -> jax.Array:
    """The flow time shift: t' = s t / (1 + (s - 1) t); s > 1 pushes t towards noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def unshift_times(t: jax.Array, shift: jax.Array | float) -> jax.Array:
    """The inverse of `shift_times`: u with shift_times(u, shift) = t."""
    return t / (shift - (shift - 1.0) * t)


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


def sample_segment_times(rng: jax.Array, segment_ids: jax.Array, num_segments: int, cfg,
                         t_range: tuple[float, float] | None = None):
    """Shifted t per segment [B, K], drawn independently for every segment of every row; with
    `t_range` = (lo, hi), every shifted t lies in [lo, hi)."""
    shape = segment_ids.shape[:1] + (num_segments,)
    shift = resolution_shift(segment_token_counts(segment_ids, num_segments), cfg)
    if t_range is None:
        return shift_times(sample_times(rng, shape, cfg), shift)
    lo, hi = (float(x) for x in t_range)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"time range {t_range!r}: expected 0 <= lo < hi <= 1")
    u = truncated_times(rng, shape, cfg, unshift_times(lo, shift), unshift_times(hi, shift))
    # Rounding at the ends must not hand a boundary time to the wrong side.
    top = jnp.nextafter(jnp.float32(hi), jnp.float32(0.0))
    return jnp.clip(shift_times(u, shift), lo, top)


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
    onehot = _counted(segment_ids, num_segments, loss_mask)   # [B, S, K]
    seg_sum = jnp.einsum("bs,bsk->bk", per_tok, onehot)
    seg_count = jnp.sum(onehot, axis=1)
    present = seg_count > 0
    seg_loss = jnp.where(present, seg_sum / jnp.maximum(seg_count, 1.0), 0.0)
    loss = jnp.sum(seg_loss) / jnp.maximum(jnp.sum(present), 1)
    return loss, seg_loss


def loss_segments(segment_ids: jax.Array, num_segments: int,
                  loss_mask: jax.Array | None = None) -> jax.Array:
    """The number of segments `packed_loss` averages over (those with a counted token), float32:
    the weight of a micro-batch's loss under gradient accumulation (vdit/train/optim.py)."""
    present = jnp.sum(_counted(segment_ids, num_segments, loss_mask), axis=1) > 0
    return jnp.sum(present).astype(jnp.float32)


def _counted(segment_ids, num_segments: int, loss_mask) -> jax.Array:
    """[B, S, K]: 1 where token s belongs to segment k + 1 and counts in the loss."""
    weight = (segment_ids > 0).astype(jnp.float32)
    if loss_mask is not None:
        weight = weight * loss_mask.astype(jnp.float32)
    onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
    return onehot * weight[..., None]
