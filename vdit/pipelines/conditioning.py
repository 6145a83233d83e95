"""Conditioning for generation beyond text: Wan2.1 I2V's latent condition, and pinning known
latent frames while sampling.

I2V conditioning (diffusers' `WanImageToVideoPipeline`, replicated exactly): the known pixel frames
(the image at frame 0; for first-last-frame models also the last frame) are placed in an otherwise
black video, VAE-encoded (posterior mean) and normalised; a mask marks the known pixel frames,
with frame 0 repeated `temporal_factor` times so the mask folds into `temporal_factor` channels
per latent frame. The DiT sees, along channels, `[noisy latents (z), mask (tf), condition (z)]`
(Wan: 16 + 4 + 16 = 36 = `in_channels`). `i2v_mask` builds the mask.

Pinning (for models without such channels, e.g. vdit's text-to-video runs): chosen latent frames
are known clean latents x0. They start on the flow's noising path, x = (1 - s) x0 + s e (e the
sample's own noise, s the first sigma), and `PinnedVelocity` hands the solver their exact velocity
e - x0 at every step, whatever the model says there. A linear flow solver (Euler, and UniPC, whose
data prediction x - s v is then exactly x0) carries such frames along that path, so after every
step they equal the known frames noised to the new sigma, which is what inpainting by replacement
does, and the model sees them as consistent noisy context at each step. At sigma 0 they are x0;
callers also set them to x0 exactly afterwards (`apply_pins`) to drop float rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def i2v_mask(known_frames: Sequence[bool], latent_hw: tuple[int, int],
             temporal_factor: int) -> np.ndarray:
    """Known pixel frames `[T]` (T = 1 + tf * (T' - 1)) -> mask `[T', h, w, tf]` float32.

    Latent frame j, channel c is pixel frame j * tf + c of the sequence with frame 0 repeated tf
    times (diffusers' fold of `mask_lat_size`)."""
    known = np.asarray(known_frames, np.float32)
    tf = int(temporal_factor)
    if known.ndim != 1 or (known.shape[0] - 1) % tf:
        raise ValueError(f"known_frames must list 1 + {tf}k pixel frames, got {known.shape}")
    expanded = np.concatenate([np.repeat(known[:1], tf), known[1:]])
    per_latent = expanded.reshape(-1, tf)  # [T', tf]
    h, w = latent_hw
    return np.ascontiguousarray(np.broadcast_to(per_latent[:, None, None, :],
                                                (per_latent.shape[0], h, w, tf)))


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
