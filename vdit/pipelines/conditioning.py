"""Conditioning for generation beyond text: Wan2.1 I2V's latent condition, and pinning known
latent frames while sampling.

I2V conditioning (diffusers' `WanImageToVideoPipeline`, replicated exactly): the known pixel frames
(the image at frame 0; for first-last-frame models also the last frame) are placed in an otherwise
black video, VAE-encoded (posterior mean) and normalised; a mask marks the known pixel frames,
with frame 0 repeated `temporal_factor` times so the mask folds into `temporal_factor` channels
per latent frame. The DiT sees, along channels, `[noisy latents (z), mask (tf), condition (z)]`
(Wan: 16 + 4 + 16 = 36 = `in_channels`). `vdit.models.patches.i2v_mask` builds the mask (its
layout is the model's; the training data builds the same).

Pinning (for models without such channels, e.g. vdit's text-to-video runs): chosen latent frames
are known clean latents x0. They start on the flow's noising path, x = (1 - s) x0 + s e (e the
sample's own noise, s the first sigma), and `PinnedVelocity` hands the solver their exact velocity
e - x0 at every step, whatever the model says there. A linear flow solver (Euler, and UniPC, whose
data prediction x - s v is then exactly x0) carries such frames along that path, so after every
step they equal the known frames noised to the new sigma, which is what inpainting by replacement
does, and the model sees them as consistent noisy context at each step. At sigma 0 they are x0;
callers also set them to x0 exactly afterwards (`apply_pins`) to drop float rounding.

Clean first frame (Wan2.2 TI2V image-to-video, diffusers' `expand_timesteps`): the model sees the
image's clean latent in latent frame 0 and timestep 0 on that frame's tokens, the step's timestep
elsewhere (`CleanFirstFrame`); the solver's own frame 0 is ignored and set to the image latent at
the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdit.models import patches

# Decoded frames may overshoot [-1, 1] by rounding; [0, 255] or [0, 65535] input is far past this.
PIXEL_SLACK = 0.01


def pixels(name: str, array) -> jnp.ndarray:
    """Conditioning images or videos as float32 in [-1, 1]: integer arrays (uint8 frames) and
    concrete values past the range are an error naming the input, not a silent cast."""
    dtype = array.dtype if hasattr(array, "dtype") else np.asarray(array).dtype
    if not jnp.issubdtype(dtype, jnp.floating):  # bfloat16 too
        raise ValueError(f"{name}: expected float pixels in [-1, 1], got dtype {dtype} "
                         "(uint8 frames: x / 127.5 - 1)")
    array = jnp.asarray(array, jnp.float32)
    if isinstance(array, jax.core.Tracer) or not array.size:  # checked where it is concrete
        return array
    low, high = (float(v) for v in jnp.stack([array.min(), array.max()]))  # no host copy
    if low < -1 - PIXEL_SLACK or high > 1 + PIXEL_SLACK:
        raise ValueError(f"{name}: pixel values span [{low:g}, {high:g}]; expected [-1, 1] "
                         "(from [0, 255]: x / 127.5 - 1; from [0, 1]: 2x - 1)")
    return array


def known_pixel_frames(frames: int, first: int = 1, last: int = 0) -> np.ndarray:
    """Bool `[frames]`: the first `first` and the last `last` pixel frames are known."""
    if first + last > frames:
        raise ValueError(f"{first} leading + {last} trailing known frames exceed {frames} frames")
    known = np.zeros(frames, bool)
    known[:first] = True
    if last:
        known[frames - last:] = True
    return known


def latent_frame_mask(batch: int, num_latent_frames: int, pinned: Sequence[int]) -> np.ndarray:
    """`[B, T', 1, 1, 1]` float32 with 1 at the pinned latent frame indices."""
    mask = np.zeros((batch, num_latent_frames, 1, 1, 1), np.float32)
    for j in pinned:
        if not -num_latent_frames <= j < num_latent_frames:
            raise ValueError(f"pinned latent frame {j} is outside [0, {num_latent_frames})")
        mask[:, j] = 1.0
    return mask


@dataclasses.dataclass(frozen=True)
class PinnedVelocity:
    """velocity_fn(x, timesteps, pin, *inner_args): `inner`'s velocity, with frames where
    `pin = (known [B, T', h, w, C], mask [B, T', 1, 1, 1], noise [B, T', h, w, C])` has mask 1
    replaced by their exact flow velocity noise - known. Hashable (keys the compiled loop)."""

    inner: Any

    def __call__(self, x, timesteps, pin, *args):
        known, mask, noise = pin
        v = self.inner(x, timesteps, *args).astype(jnp.float32)
        return v + mask * ((noise - known) - v)


def pin_start(x, pin, sigma: float):
    """Puts the pinned frames of x on the noising path at `sigma`: (1 - s) known + s noise."""
    known, mask, noise = pin
    on_path = (1.0 - sigma) * known + sigma * noise
    return x + mask * (on_path - x)


def apply_pins(latents, pin):
    """Sets the pinned frames to their known clean latents exactly."""
    known, mask, _ = pin
    return latents + mask * (known - latents)


@dataclasses.dataclass(frozen=True)
class CleanFirstFrame:
    """velocity_fn(x, timesteps, params, clean, *inner_args) for TI2V image-to-video.

    x [B, T', h, w, C]; timesteps [B]; clean [B, 1, h, w, C] (the image's normalised latent).
    `inner(x', timesteps' [B, N], params, *inner_args)` sees x with frame 0 replaced by `clean`
    and per-token timesteps: 0 on frame 0's tokens, the step's elsewhere (N tokens in (t, h, w)
    order, as the DiT patchifies). `patch_size` is the DiT's (pt must be 1: a token of frame 0
    must not also hold frame 1)."""

    inner: Any
    patch_size: tuple[int, int, int]

    def __post_init__(self):
        if self.patch_size[0] != 1:
            raise ValueError(f"a clean first latent frame needs a temporal patch of 1, got "
                             f"patch_size={self.patch_size}")

    def __call__(self, x, timesteps, params, clean, *args):
        x = x.at[:, :1].set(clean.astype(x.dtype))
        grid = patches.grid_shape(x.shape[1:], self.patch_size)
        per_frame = grid[1] * grid[2]
        frame0 = jnp.arange(grid[0] * per_frame) < per_frame  # [N]
        per_token = jnp.where(frame0[None], 0.0, timesteps[:, None]).astype(timesteps.dtype)
        return self.inner(x, per_token, params, *args)
