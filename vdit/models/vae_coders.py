"""Encoder and decoder of the causal 3D VAE (Wan2.1 layout) and the loop that runs either over a
clip chunk by chunk.

Each coder maps one chunk plus the caches kept from the previous chunk (None on the clip's first
chunk) to its output and the new caches; parameter names follow diffusers' module tree
(`down_blocks_N`, `mid_block`, `up_blocks_N/resnets_M`, ...), see `vdit/convert/wan_vae.py`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.models.vae_blocks import (
    ChannelRMSNorm,
    Conv3d,
    MidBlock,
    Resample,
    ResidualBlock,
    causal_conv,
    sub_cache,
)
from vdit.models.vae_residual import ResidualDownBlock, ResidualUpBlock


class _Coder(nn.Module):
    def _conv(self, features: int, name: str):
        return Conv3d(features, dtype=self.dtype, impl=self.conv_impl, name=name)


class Encoder(_Coder):
    """[B, T, H, W, Cin] -> [B, T', H/f, W/f, out_dim] for one chunk; see `vae_blocks`.
    `is_residual` (Wan2.2): one `ResidualDownBlock` per stage instead of a flat list of blocks."""

    base_dim: int
    out_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_downsample: tuple[bool, ...]
    dropout: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    is_residual: bool = False

    @nn.compact
    def __call__(self, x, cache, deterministic: bool = True):
        dims = [self.base_dim * m for m in (1, *self.dim_mult)]
        new = {}
        x, new["conv_in"] = causal_conv(self._conv(dims[0], "conv_in"), x,
                                        sub_cache(cache, "conv_in"))
        for n, block in enumerate(self._down_blocks(dims)):
            name = f"down_blocks_{n}"
            x, new[name] = block(name=name)(x, sub_cache(cache, name), deterministic)
        x, new["mid_block"] = MidBlock(self.dropout, self.dtype, self.conv_impl, name="mid_block")(
            x, sub_cache(cache, "mid_block"), deterministic)
        x = jax.nn.silu(ChannelRMSNorm(name="norm_out")(x))
        x, new["conv_out"] = causal_conv(self._conv(self.out_dim, "conv_out"),
                                         x, sub_cache(cache, "conv_out"))
        return x, new

    def _down_blocks(self, dims):
        """Module constructors (taking `name=`) in diffusers' numbering of `down_blocks`."""
        common = dict(dtype=self.dtype, conv_impl=self.conv_impl)
        last = len(self.dim_mult) - 1
        if self.is_residual:
            return [functools.partial(ResidualDownBlock, out_dim, self.num_res_blocks,
                                      i != last and self.temperal_downsample[i], i != last,
                                      self.dropout, **common)
                    for i, out_dim in enumerate(dims[1:])]
        blocks = []
        for i, out_dim in enumerate(dims[1:]):
            blocks += [functools.partial(ResidualBlock, out_dim, self.dropout, **common)
                       ] * self.num_res_blocks
            if i != last:
                mode = "downsample3d" if self.temperal_downsample[i] else "downsample2d"
                blocks.append(functools.partial(Resample, mode, out_dim, **common))
        return blocks


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then (unless last) a Resample to out_dim // 2."""

    out_dim: int
    num_res_blocks: int
    upsample_mode: str | None
    dropout: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache, deterministic: bool = True):
        new = {}
        for j in range(self.num_res_blocks + 1):
            name = f"resnets_{j}"
            x, new[name] = ResidualBlock(self.out_dim, self.dropout, self.dtype, self.conv_impl,
                                       name=name)(
                x, sub_cache(cache, name), deterministic)
        if self.upsample_mode is not None:
            x, new["upsamplers_0"] = Resample(self.upsample_mode, self.out_dim // 2, self.dtype,
                                              self.conv_impl, name="upsamplers_0")(
                x, sub_cache(cache, "upsamplers_0"), deterministic)
        return x, new


class Decoder(_Coder):
    """[B, T', h, w, z] -> [B, T, h*f, w*f, out_dim] for one chunk; mirror of the encoder.
    `is_residual` (Wan2.2): `ResidualUpBlock`s, whose resamplers keep the block's width."""

    base_dim: int
    out_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_upsample: tuple[bool, ...]
    dropout: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    is_residual: bool = False

    @nn.compact
    def __call__(self, x, cache, deterministic: bool = True):
        dims = [self.base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        new = {}
        x, new["conv_in"] = causal_conv(self._conv(dims[0], "conv_in"), x,
                                        sub_cache(cache, "conv_in"))
        x, new["mid_block"] = MidBlock(self.dropout, self.dtype, self.conv_impl, name="mid_block")(
            x, sub_cache(cache, "mid_block"), deterministic)
        for i, out_dim in enumerate(dims[1:]):
            up = i != len(self.dim_mult) - 1
            name = f"up_blocks_{i}"
            if self.is_residual:
                block = ResidualUpBlock(out_dim, self.num_res_blocks,
                                        up and self.temperal_upsample[i], up, self.dropout,
                                        self.dtype, self.conv_impl, name=name)
            else:
                mode = None
                if up:
                    mode = "upsample3d" if self.temperal_upsample[i] else "upsample2d"
                block = UpBlock(out_dim, self.num_res_blocks, mode, self.dropout, self.dtype,
                                self.conv_impl, name=name)
            x, new[name] = block(x, sub_cache(cache, name), deterministic)
        x = jax.nn.silu(ChannelRMSNorm(name="norm_out")(x))
        x, new["conv_out"] = causal_conv(self._conv(self.out_dim, "conv_out"),
                                         x, sub_cache(cache, "conv_out"))
        return x, new


def run_in_chunks(coder: nn.Module, x, chunk: int, deterministic: bool, chunked: bool):
    """Runs `coder` over time: frame 0 alone, then `chunk` frames at a time under `nn.scan` (or, if
    not `chunked`, all remaining frames in one call). x [B, 1 + chunk*n, ...] -> outputs along time.
    """
    first, cache = coder(x[:, :1], None, deterministic)
    rest = x[:, 1:]
    if rest.shape[1] == 0:
        return first
    if not chunked:
        out, _ = coder(rest, cache, deterministic)
        return jnp.concatenate([first, out], axis=1)

    def body(module, carry, xs):
        out, carry = module(xs, carry, deterministic)
        return carry, out

    scan = nn.scan(body, variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True}, in_axes=1, out_axes=1)
    steps = rest.reshape(rest.shape[0], rest.shape[1] // chunk, chunk, *rest.shape[2:])
    _, out = scan(coder, cache, steps)
    out = out.reshape(out.shape[0], out.shape[1] * out.shape[2], *out.shape[3:])
    return jnp.concatenate([first, out], axis=1)
