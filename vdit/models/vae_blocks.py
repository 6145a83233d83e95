"""Building blocks of the causal 3D VAE (Wan2.1 layout): causal convs with a frame cache, channel
RMS norm, residual and per-frame attention blocks, spatial/temporal resampling.

Activations are channels-last `[B, T, H, W, C]`. A block that looks at past frames takes `cache`
(what it kept from the previous chunk of the clip, or None on a clip's first chunk) and returns
`(output, new_cache)`. Caches have the same shapes for every chunk after the first, so a clip can
be run chunk by chunk under `nn.scan` with the caches as carry. The first chunk is special because
Wan's temporal resamplers let frame 0 through on its own.
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# A 3-tap causal kernel sees two past frames.
CACHE_FRAMES = 2
# F.normalize's clamp on the norm, which the Wan weights were trained with.
NORM_EPS = 1e-12

# Kernel window axes stay whole (None): flax rejects a logical name repeated within one array, so
# the rule table's single "conv_kernel" name cannot label all three.
KERNEL_3D_AXES = (None, None, None, "conv_in", "conv_out")
KERNEL_2D_AXES = (None, None, "conv_in", "conv_out")
ACTIVATION_AXES = ("activation_batch", "activation_time", "activation_height", "activation_width",
                   "activation_channels")

Cache = Any  # nested dicts of arrays [B, frames, H, W, C]


def constrain(x):
    """Logical sharding of a video activation (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


def sub_cache(cache: Cache, name: str) -> Cache:
    return None if cache is None else cache[name]


def _conv_params(module: nn.Module, kernel_shape: tuple, axes: tuple):
    kernel = module.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                  axes), kernel_shape, jnp.float32)
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              ("conv_out",)), (kernel_shape[-1],),
                        jnp.float32)
    return kernel, bias


CONV3D_IMPLS = ("auto", "native", "taps")


class Conv3d(nn.Module):
    """3D conv, 'valid' along time (callers prepend past frames), zero padding `k // 2` in space.

    [B, T, H, W, Cin] -> [B, (T - kt) // stride_t + 1, H, W, features]; kernel [kt, kh, kw, Cin, Cout].
    `impl` "native" is one 3D convolution; "taps" sums kt per-frame 2D convolutions (2-4x faster
    on XLA's CPU backend); "auto" takes "taps" on CPU and "native" elsewhere.
    """

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    stride_t: int = 1
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, zero_frames: int = 0):
        """`zero_frames`: how many leading frames of `x` are known zeros (the padding before a
        clip's first chunk); taps that only ever see those are skipped, which makes an image (one
        frame after two zero frames) cost one 2D conv instead of three."""
        kt, kh, kw = self.kernel_size
        kernel, bias = _conv_params(self, (kt, kh, kw, x.shape[-1], self.features), KERNEL_3D_AXES)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.impl not in CONV3D_IMPLS:
            raise ValueError(f"conv3d impl {self.impl!r}; expected one of {CONV3D_IMPLS}")
        impl = self.impl
        if impl == "auto":
            impl = "taps" if jax.default_backend() == "cpu" else "native"
        steps = (x.shape[1] - kt) // self.stride_t + 1
        # the last frame tap i sees is i + stride * (steps - 1): skip it if that is still padding
        live = [i for i in range(kt) if i + self.stride_t * (steps - 1) >= zero_frames]
        if len(live) < kt:
            y = sum(self._tap(x, kernel[i], i) for i in live)
        elif impl == "native" and (kh, kw) != (1, 1):
            y = lax.conv_general_dilated(
                x, kernel, window_strides=(self.stride_t, 1, 1),
                padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        else:
            y = sum(self._tap(x, kernel[i], i) for i in range(kt))
        return y + bias.astype(self.dtype)

    def _tap(self, x, kernel, offset: int):
        """Kernel tap `offset` applied to the frames it sees at each output step."""
        b, t = x.shape[:2]
        steps = (t - self.kernel_size[0]) // self.stride_t + 1
        frames = x[:, offset:offset + self.stride_t * (steps - 1) + 1:self.stride_t]
        kh, kw = kernel.shape[:2]
        if (kh, kw) == (1, 1):
            return jnp.einsum("bthwc,cd->bthwd", frames, kernel[0, 0])
        y = lax.conv_general_dilated(
            frames.reshape(b * steps, *frames.shape[2:]), kernel, window_strides=(1, 1),
            padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(b, steps, *y.shape[1:])


class Conv2d(nn.Module):
    """Per-frame 2D conv: [B, T, H, W, Cin] -> [B, T, H', W', features]; kernel [kh, kw, Cin, Cout].

    `padding` is ((top, bottom), (left, right)), given explicitly because Wan's downsampler pads
    only the bottom/right side.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    stride: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t = x.shape[:2]
        kh, kw = self.kernel_size
        kernel, bias = _conv_params(self, (kh, kw, x.shape[-1], self.features), KERNEL_2D_AXES)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.kernel_size == (1, 1):
            return jnp.einsum("bthwc,cd->bthwd", x, kernel[0, 0]) + bias.astype(self.dtype)
        y = lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]), kernel, window_strides=(self.stride, self.stride),
            padding=self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(b, t, *y.shape[1:]) + bias.astype(self.dtype)


class ChannelRMSNorm(nn.Module):
    """x / max(||x||_2 over channels, eps) * sqrt(C) * gamma, computed in float32."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                  ("norm",)), (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        return (xf / jnp.maximum(norm, NORM_EPS) * (math.sqrt(c) * gamma)).astype(x.dtype)


def causal_conv(conv: nn.Module, x, cache):
    """Runs a 3-tap causal conv on a chunk after its `CACHE_FRAMES` past frames (zeros before the
    clip starts); returns (output [B, T, ...], the new cache = last frames of history + chunk)."""
    zero_frames = 0
    if cache is None:
        cache = jnp.zeros((x.shape[0], CACHE_FRAMES, *x.shape[2:]), x.dtype)
        zero_frames = CACHE_FRAMES
    full = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return conv(full, zero_frames=zero_frames), full[:, -CACHE_FRAMES:]


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> dropout -> causal conv, plus a shortcut
    (a 1x1x1 conv when the channel count changes)."""

    out_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache: Cache, deterministic: bool = True):
        conv = lambda name, k=(3, 3, 3): Conv3d(self.out_dim, k, dtype=self.dtype,
                                                impl=self.conv_impl, name=name)
        shortcut = x if x.shape[-1] == self.out_dim else conv("conv_shortcut", (1, 1, 1))(x)
        h = jax.nn.silu(ChannelRMSNorm(name="norm1")(x))
        h, cache1 = causal_conv(conv("conv1"), h, sub_cache(cache, "conv1"))
        h = jax.nn.silu(ChannelRMSNorm(name="norm2")(h))
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h, cache2 = causal_conv(conv("conv2"), h, sub_cache(cache, "conv2"))
        return constrain(h + shortcut), {"conv1": cache1, "conv2": cache2}


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately, residual."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        y = ChannelRMSNorm(name="norm")(x)
        qkv = Conv2d(3 * c, (1, 1), dtype=self.dtype, name="to_qkv")(y)
        q, k, v = jnp.split(qkv.reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
        out = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(c), softmax over positions
        out = Conv2d(c, (1, 1), dtype=self.dtype, name="proj")(out.reshape(b, t, h, w, c))
        return x + out.astype(x.dtype)


class MidBlock(nn.Module):
    """Residual block, attention, residual block (the bottleneck of encoder and decoder)."""

    dropout: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache: Cache, deterministic: bool = True):
        dim = x.shape[-1]
        x, c0 = ResidualBlock(dim, self.dropout, self.dtype, self.conv_impl, name="resnets_0")(
            x, sub_cache(cache, "resnets_0"), deterministic)
        x = AttentionBlock(self.dtype, name="attentions_0")(x)
        x, c1 = ResidualBlock(dim, self.dropout, self.dtype, self.conv_impl, name="resnets_1")(
            x, sub_cache(cache, "resnets_1"), deterministic)
        return x, {"resnets_0": c0, "resnets_1": c1}


RESAMPLE_MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")


class Resample(nn.Module):
    """Spatial 2x down/up-sampling, optionally with 2x in time (the '3d' modes).

    downsample: pad bottom/right by 1, 3x3 conv with stride 2 (per frame); in '3d' mode then a
      (3,1,1) conv with time stride 2 over [last frame of the previous chunk, chunk]. The clip's
      first chunk passes through it unchanged, so 1 + 2n frames become 1 + n.
    upsample: in '3d' mode first a causal (3,1,1) conv to 2C channels whose two halves become two
      consecutive frames (the first chunk passes through, so 1 + n frames become 1 + 2n); then
      nearest 2x in space and a 3x3 conv to `out_dim` channels.
    """

    mode: str
    out_dim: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache: Cache, deterministic: bool = True):
        if self.mode not in RESAMPLE_MODES:
            raise ValueError(f"Resample mode {self.mode!r}; expected one of {RESAMPLE_MODES}")
        new_cache = {}
        if self.mode == "upsample3d":
            x, new_cache = self._time_upsample(x, cache)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            x = Conv2d(self.out_dim, dtype=self.dtype, name="resample")(x)
        else:
            x = Conv2d(self.out_dim, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                       name="resample")(x)
        if self.mode == "downsample3d":
            x, new_cache = self._time_downsample(x, cache)
        return constrain(x), new_cache

    def _time_conv(self, features: int, stride_t: int):
        return Conv3d(features, (3, 1, 1), stride_t, dtype=self.dtype, impl=self.conv_impl,
                      name="time_conv")

    def _time_downsample(self, x, cache):
        conv = self._time_conv(x.shape[-1], 2)
        if cache is None:
            if self.is_initializing():  # the first chunk skips the conv; create its params anyway
                conv(jnp.zeros((x.shape[0], 3, *x.shape[2:]), x.dtype))
            return x, {"last": x[:, -1:]}
        full = jnp.concatenate([cache["last"].astype(x.dtype), x], axis=1)
        return conv(full), {"last": x[:, -1:]}

    def _time_upsample(self, x, cache):
        b, t, h, w, c = x.shape
        conv = self._time_conv(2 * c, 1)
        if cache is None:
            if self.is_initializing():
                conv(jnp.zeros((b, 3, h, w, c), x.dtype))
            return x, {"time_conv": jnp.zeros((b, CACHE_FRAMES, h, w, c), x.dtype)}
        y, time_cache = causal_conv(conv, x, cache["time_conv"])
        # channel half s of output frame i becomes frame 2i + s
        y = einops.rearrange(y, "b t h w (s c) -> b (t s) h w c", s=2)
        return y, {"time_conv": time_cache}
