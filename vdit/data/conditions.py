"""Per-clip conditioning beyond text, from encode to packed tokens: the Wan2.1 image-to-video
condition latents and the micro-conditioning scalars (fps, motion).

I2V condition (the layout of diffusers' `WanImageToVideoPipeline`, which `Generator` samples
with): the clip with every pixel frame but the known ones zeroed is VAE-encoded (posterior mean)
and normalised; a mask `[T', h, w, tf]` marks the known pixel frames (`i2v_mask`). The condition is
`concat(mask, latents)` `[T', h, w, tf + z]`; the DiT input is `[noisy latents | mask | latents]`.
`vdit encode` with `config.encode.i2v_condition=True` stores the first-frame condition of each clip
as the record key `cond_latents`, and with `config.encode.last_frame_condition=True` also the
first-and-last-frame one (keyframe interpolation, Wan's FLF2V task) as `cond_latents_last`; the
pipeline picks one per clip (the latter at rate `train.last_frame_rate`) and patchifies it like the
latents (`cond_tokens`).

Micro-conditioning values come from a record's `meta`: "fps" (frames per second) and "motion"
(frame short sides per second; see `vdit/models/micro.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from vdit.models import patches
from vdit.models.vae import normalize_latents
from vdit.models.vae_config import vae_from_config

COND_KEY = "cond_latents"      # record key written by `vdit encode`: first frame known
COND_KEY_LAST = "cond_latents_last"  # first and last frames known
COND_TOKENS = "cond_tokens"    # packed batch key
MICRO_PREFIX = "micro_"        # packed batch keys: micro_fps, micro_motion [rows, max_segments]


def condition_latents(video, known: Sequence[bool], encode: Callable, temporal_factor: int):
    """video [B, T, H, W, 3] in [-1, 1]; known [T] bool; encode(video) -> normalised latents
    [B, T', h, w, z] -> the Wan I2V condition [B, T', h, w, tf + z] (mask, then latents)."""
    known = np.asarray(known, bool)
    if known.shape != (video.shape[1],):
        raise ValueError(f"known must flag each of the video's {video.shape[1]} frames, got "
                         f"shape {known.shape}")
    latents = encode(jnp.asarray(video, jnp.float32) * known[None, :, None, None, None])
    mask = patches.i2v_mask(known, latents.shape[2:4], temporal_factor)
    mask = jnp.broadcast_to(jnp.asarray(mask), latents.shape[:1] + mask.shape)
    return jnp.concatenate([mask, latents.astype(jnp.float32)], axis=-1)


def first_frame_known(frames: int) -> np.ndarray:
    """Bool [frames]: only pixel frame 0 is given (image-to-video)."""
    known = np.zeros(frames, bool)
    known[0] = True
    return known


def first_last_known(frames: int) -> np.ndarray:
    """Bool [frames]: pixel frames 0 and frames - 1 are given (keyframe interpolation)."""
    known = first_frame_known(frames)
    known[-1] = True
    return known


def cond_tokens(record: dict, latent_shape: tuple[int, ...], patch_size,
                key: str = COND_KEY) -> np.ndarray:
    """A record's condition `key` [T', H', W', tf + z] -> tokens [N, pt*ph*pw*(tf + z)]."""
    if key not in record:
        flag = "i2v_condition" if key == COND_KEY else "last_frame_condition"
        raise ValueError(f"a latent record has no {key!r} but config.train.i2v_rate > 0 needs "
                         f"it: encode the shards with config.encode.{flag}=True")
    cond = np.asarray(record[key], np.float32)
    if cond.ndim != 4 or cond.shape[:3] != tuple(latent_shape[:3]):
        raise ValueError(f"record {key} has shape {cond.shape}; expected "
                         f"[{', '.join(map(str, latent_shape[:3]))}, tf + z] like its latents "
                         f"{tuple(latent_shape)}")
    return patches.patchify(cond, patch_size)[0]


def micro_value(record: dict, name: str) -> np.ndarray:
    """meta[name] of a record as a float32 [1] (one value per segment once packed)."""
    meta = record.get("meta") or {}
    if name not in meta:
        raise ValueError(f"a latent record's meta has no {name!r} (has {sorted(meta)}) but "
                         f"config.model.micro_conditioning lists it: re-encode the shards")
    value = float(meta[name])
    if not np.isfinite(value):
        raise ValueError(f"a latent record has meta {name}={meta[name]!r}; expected a finite number")
    return np.asarray([value], np.float32)


def encode_condition_fn(config, encode_fn: Callable, mean, std) -> Callable | None:
    """`vdit encode`'s I2V conditions when `config.encode.i2v_condition` (else None):
    video [B, T, H, W, 3] -> {record key: [B, T', h, w, tf + z] numpy}, normalised like the
    latents: `cond_latents` (first frame known) and, with `encode.last_frame_condition`,
    `cond_latents_last` (first and last known; for a single frame the same as the first).
    `encode_fn` gives the raw posterior mean; mean/std are the per-channel stats."""
    if not config.encode.get("i2v_condition", False):
        return None

    tf = vae_from_config(config.vae).temporal_factor
    normalised = lambda v: normalize_latents(jnp.asarray(encode_fn(v), jnp.float32), mean, std)
    variants = {COND_KEY: first_frame_known}
    if config.encode.get("last_frame_condition", False):
        variants[COND_KEY_LAST] = first_last_known
    return lambda video: {key: np.asarray(condition_latents(video, known(video.shape[1]),
                                                            normalised, tf))
                          for key, known in variants.items()}
