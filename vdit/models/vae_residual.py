"""The Wan2.2 VAE's pieces (diffusers `AutoencoderKLWan(is_residual=True, patch_size=2)`): the 2x2
pixel patching at the VAE's ends, the parameter-free space/time-to-channel shortcuts, and the
residual down/up blocks that add those shortcuts around the Wan2.1 residual blocks and resamplers.

Arrays are channels-last `[B, T, H, W, C]`. The channel orders of patching and of the shortcuts
follow diffusers' `patchify`, `AvgDown3D` and `DupUp3D` exactly, since trained weights depend on
them. Blocks take and return caches like `vae_blocks` (None = a clip's first chunk).
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from vdit.models.vae_blocks import Resample, ResidualBlock, sub_cache


def patchify(x, p: int):
    """[B, T, H, W, C] -> [B, T, H/p, W/p, C*p*p]; channel c*p*p + pw*p + ph (diffusers' order)."""
    b, t, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"VAE patchify: frame size {h}x{w} is not a multiple of patch_size={p}")
    return einops.rearrange(x, "b t (h ph) (w pw) c -> b t h w (c pw ph)", ph=p, pw=p)


def unpatchify(x, p: int):
    """Inverse of `patchify`: [B, T, h, w, C*p*p] -> [B, T, h*p, w*p, C]."""
    return einops.rearrange(x, "b t h w (c pw ph) -> b t (h ph) (w pw) c", ph=p, pw=p)


def avg_down(x, out_dim: int, factor_t: int, factor_s: int):
    """diffusers' AvgDown3D: fold (ft, fs, fs) blocks into channels, then average groups of them.

    [B, T, H, W, C] -> [B, ceil(T/ft), H/fs, W/fs, out_dim]; T is first padded at the front with
    zero frames to a multiple of ft (a clip's first single frame averages with zeros)."""
    pad_t = (-x.shape[1]) % factor_t
    if pad_t:
        x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
    x = einops.rearrange(x, "b (t ft) (h fh) (w fw) c -> b t h w (c ft fh fw)",
                         ft=factor_t, fh=factor_s, fw=factor_s)
    return einops.reduce(x, "b t h w (o g) -> b t h w o", "mean", o=out_dim)


def dup_up(x, out_dim: int, factor_t: int, factor_s: int, first_chunk: bool):
    """diffusers' DupUp3D: repeat channels, then unfold them into (ft, fs, fs) blocks.

    [B, T, H, W, C] -> [B, T*ft, H*fs, W*fs, out_dim]; on a clip's first chunk the first ft - 1
    output frames are dropped (its single frame stays single)."""
    x = jnp.repeat(x, out_dim * factor_t * factor_s * factor_s // x.shape[-1], axis=-1)
    x = einops.rearrange(x, "b t h w (o ft fh fw) -> b (t ft) (h fh) (w fw) o",
                         o=out_dim, ft=factor_t, fh=factor_s, fw=factor_s)
    return x[:, factor_t - 1:] if first_chunk else x


class ResidualDownBlock(nn.Module):
    """`num_res_blocks` residual blocks and (if `down`) a 2x resampler (also 2x in time if
    `temporal`), plus `avg_down` of the block's input as a shortcut."""

    out_dim: int
    num_res_blocks: int
    temporal: bool
    down: bool
    dropout: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache, deterministic: bool = True):
        shortcut = avg_down(x, self.out_dim, 2 if self.temporal else 1, 2 if self.down else 1)
        new = {}
        for j in range(self.num_res_blocks):
            name = f"resnets_{j}"
            x, new[name] = ResidualBlock(self.out_dim, self.dropout, self.dtype, self.conv_impl,
                                         name=name)(x, sub_cache(cache, name), deterministic)
        if self.down:
            mode = "downsample3d" if self.temporal else "downsample2d"
            x, new["downsampler"] = Resample(mode, self.out_dim, self.dtype, self.conv_impl,
                                             name="downsampler")(
                x, sub_cache(cache, "downsampler"), deterministic)
        return x + shortcut.astype(x.dtype), new


class ResidualUpBlock(nn.Module):
    """`num_res_blocks + 1` residual blocks and (if `up`) a 2x resampler to `out_dim` channels
    (also 2x in time if `temporal`), plus `dup_up` of the block's input as a shortcut."""

    out_dim: int
    num_res_blocks: int
    temporal: bool
    up: bool
    dropout: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache, deterministic: bool = True):
        x_in = x
        new = {}
        for j in range(self.num_res_blocks + 1):
            name = f"resnets_{j}"
            x, new[name] = ResidualBlock(self.out_dim, self.dropout, self.dtype, self.conv_impl,
                                         name=name)(x, sub_cache(cache, name), deterministic)
        if self.up:
            mode = "upsample3d" if self.temporal else "upsample2d"
            x, new["upsampler"] = Resample(mode, self.out_dim, self.dtype, self.conv_impl,
                                           name="upsampler")(
                x, sub_cache(cache, "upsampler"), deterministic)
            x = x + dup_up(x_in, self.out_dim, 2 if self.temporal else 1, 2,
                           first_chunk=cache is None).astype(x.dtype)
        return x, new
