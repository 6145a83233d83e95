"""The DiT as the sampler's velocity function: classifier-free guidance with cond and uncond in
one call, optional I2V condition channels, and vdit's packed call for runs trained on packed text;
`TwoExperts` switches between two such velocities by the step's timestep (Wan2.2 A14B)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from vdit.diffusion.samplers import cfg_velocity
from vdit.models import patches


@dataclasses.dataclass(frozen=True)
class GuidedDiT:
    """velocity_fn(x, timesteps, params, cond, uncond) for the sampler; hashable so the loop
    compiles once. cond/uncond = (context [B, L, D], context_segment_ids [B, L]) or, for
    image-conditioned runs, (context, ids, condition [B, T', H', W', C_cond] or None,
    image_context [B, N, D_img] or None[, micro {name: [B]} or None]); the condition is
    concatenated to x along channels.

    `mask_text`: a token sees only its prompt's real text tokens (vdit-trained models, which
    train on packed, unpadded text); False attends to every position, as Wan2.1 does."""

    dit: Any
    guidance: float
    mask_text: bool

    def __call__(self, x, timesteps, params, cond, uncond):
        return cfg_velocity(functools.partial(self._model, params), self.guidance)(
            x, timesteps, cond, uncond)

    def _model(self, params, x, timesteps, cond):
        context, context_ids, *extra = cond
        condition, image, micro = (tuple(extra) + (None, None, None))[:3]
        if condition is not None:
            x = jnp.concatenate([x, condition.astype(x.dtype)], axis=-1)
        if not self.mask_text:
            return self.dit.apply({"params": params}, x, timesteps, context, image_context=image,
                                  micro=micro)
        b = x.shape[0]
        grid = patches.grid_shape(x.shape[1:], self.dit.patch_size)
        tokens = patches.patchify_batch(x, self.dit.patch_size)
        n = tokens.shape[1]
        positions = jnp.broadcast_to(jnp.asarray(patches.grid_positions(grid)), (b, n, 3))
        # per-token timesteps [B, N] (a clean first frame) pick their column by time_ids
        per_token = timesteps.ndim == 2
        time_ids = jnp.broadcast_to(jnp.arange(1, n + 1), (b, n)) if per_token else None
        columns = timesteps if per_token else timesteps[:, None]
        if micro is not None:
            micro = {k: jnp.broadcast_to(v[:, None], columns.shape) for k, v in micro.items()}
        out = self.dit.apply({"params": params}, tokens, positions, jnp.ones((b, n), jnp.int32),
                             columns, context, context_ids, time_ids=time_ids,
                             image_context=image, micro=micro, method="packed")
        return patches.unpatchify_batch(out, grid, self.dit.patch_size)


@dataclasses.dataclass(frozen=True)
class TwoExperts:
    """velocity_fn(x, timesteps, (params_high, params_low), *args), diffusers' Wan2.2 two-stage
    denoising: `high(x, timesteps, params_high, *args)` at steps whose timestep t >= `boundary`
    (boundary_ratio * num_train_timesteps), `low(...)` below it. timesteps [B] hold the step's
    t in every row; the comparison is in float32, as torch compares a timestep tensor with the
    Python boundary. Only the chosen expert runs (`lax.cond`). Hashable."""

    high: Any
    low: Any
    boundary: float

    def __call__(self, x, timesteps, params, *args):
        high_params, low_params = params
        t = jnp.asarray(timesteps, jnp.float32).reshape(-1)[0]
        return jax.lax.cond(
            t >= jnp.float32(self.boundary),
            lambda: self.high(x, timesteps, high_params, *args).astype(jnp.float32),
            lambda: self.low(x, timesteps, low_params, *args).astype(jnp.float32))
