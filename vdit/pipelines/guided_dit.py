"""The DiT as the sampler's velocity function: classifier-free guidance with cond and uncond in
one call, optional I2V condition channels, and vdit's packed call for runs trained on packed text."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp

from vdit.data import patches
from vdit.diffusion.samplers import cfg_velocity


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
        out = self.dit.apply({"params": params}, tokens, positions, jnp.ones((b, n), jnp.int32),
                             timesteps[:, None], context, context_ids, image_context=image,
                             micro=None if micro is None else {k: v[:, None] for k, v in micro.items()},
                             method="packed")
        return patches.unpatchify_batch(out, grid, self.dit.patch_size)
