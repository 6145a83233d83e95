"""Spacetime patches: latents <-> tokens, and each token's integer (t, h, w) grid position.

A latent video `[T', H', W', C]` is cut into non-overlapping `(pt, ph, pw)` patches. Patches are
listed in (t, h, w) raster order and each becomes a token whose features are ordered
`(pt, ph, pw, C)` (channels fastest). With that order a linear layer on tokens equals Wan's Conv3d
patch embedding once its `[D, C, pt, ph, pw]` kernel is transposed to `[pt, ph, pw, C, D]` and
flattened (see `vdit/convert/wan_dit.py`), and the model's output tokens unpatchify exactly as
diffusers' WanTransformer3DModel does.

Functions work on numpy arrays (data pipeline) and on jax arrays (inside the model): they only use
`.reshape`/`.transpose`. Positions are numpy int32 since they depend on static shapes only.

`i2v_mask` is the Wan2.1 I2V mask layout: which pixel frames are known, folded into
`temporal_factor` channels per latent frame (diffusers' `mask_lat_size`), as the DiT's input
channels expect it, for the training data and for generation alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import einops
import numpy as np


def _check_patch(patch_size: Sequence[int]) -> tuple[int, int, int]:
    if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"patch_size must be three positive ints (pt, ph, pw), got {patch_size}")
    return tuple(int(p) for p in patch_size)


def grid_shape(latent_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(T'/pt, H'/ph, W'/pw) for a latent `[T', H', W', ...]`; errors name the indivisible axis."""
    pt, ph, pw = _check_patch(patch_size)
    if len(latent_shape) < 3:
        raise ValueError(f"latents need at least [T', H', W'] axes, got shape {tuple(latent_shape)}")
    grid = []
    for axis, size, p in zip(("T'", "H'", "W'"), latent_shape[:3], (pt, ph, pw), strict=True):
        if size % p or size == 0:
            raise ValueError(
                f"latent {axis}={size} is not a positive multiple of the patch size {p} "
                f"(latent shape {tuple(latent_shape)}, patch_size {(pt, ph, pw)})")
        grid.append(size // p)
    return tuple(grid)


def token_dim(patch_size: Sequence[int], channels: int) -> int:
    """Features per token: pt * ph * pw * channels."""
    return math.prod(_check_patch(patch_size)) * int(channels)


def grid_positions(grid: Sequence[int]) -> np.ndarray:
    """Integer (t, h, w) of every patch of a `grid` in raster order: `[N, 3]` int32."""
    t, h, w = (int(g) for g in grid)
    idx = np.indices((t, h, w), dtype=np.int32)
    return idx.reshape(3, t * h * w).T.copy()


def patchify(latents, patch_size: Sequence[int]):
    """`[T', H', W', C]` -> (tokens `[N, pt*ph*pw*C]`, positions `[N, 3]` int32)."""
    if latents.ndim != 4:
        raise ValueError(f"patchify expects [T', H', W', C], got shape {tuple(latents.shape)}")
    tokens = patchify_batch(latents[None], patch_size)[0]
    return tokens, grid_positions(grid_shape(latents.shape, patch_size))


def unpatchify(tokens, grid: Sequence[int], patch_size: Sequence[int]):
    """`[N, pt*ph*pw*C]` tokens of a `grid` (T'/pt, H'/ph, W'/pw) -> latents `[T', H', W', C]`."""
    if tokens.ndim != 2:
        raise ValueError(f"unpatchify expects tokens [N, D], got shape {tuple(tokens.shape)}")
    return unpatchify_batch(tokens[None], grid, patch_size)[0]


def patchify_batch(latents, patch_size: Sequence[int]):
    """Dense batch: `[B, T', H', W', C]` -> tokens `[B, N, pt*ph*pw*C]` (N = product of the grid)."""
    if latents.ndim != 5:
        raise ValueError(f"patchify_batch expects [B, T', H', W', C], got {tuple(latents.shape)}")
    pt, ph, pw = _check_patch(patch_size)
    grid_shape(latents.shape[1:], patch_size)  # checks divisibility, naming the shapes
    return einops.rearrange(latents, "b (gt pt) (gh ph) (gw pw) c -> b (gt gh gw) (pt ph pw c)",
                            pt=pt, ph=ph, pw=pw)


def unpatchify_batch(tokens, grid: Sequence[int], patch_size: Sequence[int]):
    """Dense batch: tokens `[B, N, pt*ph*pw*C]` of `grid` -> latents `[B, T', H', W', C]`."""
    pt, ph, pw = _check_patch(patch_size)
    gt, gh, gw = (int(g) for g in grid)
    if tokens.ndim != 3 or tokens.shape[1] != gt * gh * gw or tokens.shape[2] % (pt * ph * pw):
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not fit grid {(gt, gh, gw)} with patch "
            f"size {(pt, ph, pw)}: expected [B, {gt * gh * gw}, a multiple of {pt * ph * pw}]")
    return einops.rearrange(tokens, "b (gt gh gw) (pt ph pw c) -> b (gt pt) (gh ph) (gw pw) c",
                            gt=gt, gh=gh, gw=gw, pt=pt, ph=ph, pw=pw)


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
