"""The causal 3D VAE in Wan2.1's layout (diffusers `AutoencoderKLWan`), or Wan2.2's by config
(`is_residual=True`, `patch_size=2`: residual down/up blocks and 2x2 pixel patching at the ends):
encoder, decoder, chunked processing in time with carried conv caches, optional spatial tiling, and
the pure helpers around the posterior and latent normalisation.

Public contract (DESIGN.md section 4):
    mean, logvar = vae.apply({"params": p}, video, method="encode")   # video [B, T, H, W, 3]
    video = vae.apply({"params": p}, latents, method="decode")         # latents [B, T', H', W', z]
with T = 1 + 4k frames in [-1, 1] and T' = 1 + k (for two temporal downsamples). Time runs in
chunks as in diffusers, the first frame alone, then 4 frames per chunk to encode and 1 latent frame
per chunk to decode, under `nn.scan` with every causal conv's cache as carry: memory does not grow
with the clip beyond its input and output, and the compiled graph does not grow with its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.models.vae_blocks import Conv3d
from vdit.models.vae_coders import Decoder, Encoder, run_in_chunks
from vdit.models.vae_fields import check_fields
from vdit.models.vae_residual import patchify, unpatchify
from vdit.models.vae_tiling import tiled_map

# Wan encodes 4 frames per chunk after the first frame; diffusers' chunk loop fixes it (T = 1+4k).
ENCODE_CHUNK_FRAMES = 4
# Wan decodes one latent frame per chunk.
DECODE_CHUNK_FRAMES = 1
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


class WanVAE(nn.Module):
    """Wan2.1 / Wan2.2 video VAE. Fields carry diffusers' `AutoencoderKLWan` config names (same
    meaning), plus the compute `dtype`, `conv_impl` (how 3D convs run, see `vae_blocks.Conv3d`)
    and spatial tiling (`use_tiling`, `tile_sample_*` in pixels, as diffusers' `enable_tiling`).

    With `patch_size` p, `in_channels`/`out_channels` count the channels of the patched frames (as
    in diffusers: Wan2.2 has 12 = 3 * 2 * 2), so videos have `video_channels` = in_channels / p^2.
    `latents_mean/std` are kept for the round trip to diffusers; the module itself never
    normalises latents (see `normalize_latents`). `scale_factor_*` (diffusers' pipelines size
    latents by them) must match the architecture when given, and are written from it.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = None  # None: the architecture's (temporal_factor)
    scale_factor_spatial: int | None = None  # None: the architecture's (spatial_factor)
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    use_tiling: bool = False
    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192

    def __post_init__(self):
        check_fields(self)
        super().__post_init__()

    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def coder_factor(self) -> int:
        """Spatial downsampling of the encoder alone (patched frames -> latents)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W: the coder's factor times the patch size."""
        return self.coder_factor * self.patch

    @property
    def video_channels(self) -> int:
        return self.in_channels // self.patch ** 2

    @property
    def output_channels(self) -> int:
        return self.out_channels // self.patch ** 2

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    def setup(self):
        common = dict(dropout=self.dropout, dtype=self.dtype, conv_impl=self.conv_impl,
                      is_residual=self.is_residual)
        self.encoder = Encoder(self.base_dim, 2 * self.z_dim, tuple(self.dim_mult),
                               self.num_res_blocks, tuple(self.temperal_downsample), **common)
        self.quant_conv = Conv3d(2 * self.z_dim, (1, 1, 1), dtype=self.dtype)
        self.post_quant_conv = Conv3d(self.z_dim, (1, 1, 1), dtype=self.dtype)
        self.decoder = Decoder(self.decoder_base_dim or self.base_dim, self.out_channels,
                               tuple(self.dim_mult), self.num_res_blocks,
                               tuple(self.temperal_downsample[::-1]), **common)

    def __call__(self, video, sample_rng=None, *, deterministic: bool = True):
        """Training-style forward: (reconstruction [B, T, H, W, C] unclamped, mean, logvar).
        With `sample_rng` the latents are sampled from the posterior, else its mean is used."""
        mean, logvar = self.encode(video, deterministic=deterministic)
        z = mean if sample_rng is None else sample_posterior(sample_rng, mean, logvar)
        return self.decode(z, clamp=False, deterministic=deterministic), mean, logvar

    def encode(self, video, *, chunked: bool = True, deterministic: bool = True):
        """video [B, 1+4k, H, W, video_channels] in [-1, 1] -> (mean, logvar), each
        [B, 1 + 4k / temporal_factor, H/f, W/f, z_dim], float32; logvar clamped like diffusers."""
        _check_video(video, self.video_channels, self.spatial_factor, self._channels_rule())
        x = video.astype(self.dtype)
        tiled = self.use_tiling and (x.shape[2] > self.tile_sample_min_height
                                     or x.shape[3] > self.tile_sample_min_width)
        if self.patch_size is not None:
            x = patchify(x, self.patch)
        h, w, f = x.shape[2], x.shape[3], self.coder_factor
        # diffusers cuts encode tiles from the patched frames at the configured pixel sizes
        tile, stride = self._tile_sizes()
        if tiled:
            tile_l, stride_l = (tile[0] // f, tile[1] // f), (stride[0] // f, stride[1] // f)
            blend = (tile_l[0] - stride_l[0], tile_l[1] - stride_l[1])
            out = tiled_map(self._tile_scan("_encode_tile", chunked, deterministic), x, tile,
                            stride, blend, stride_l, (h // f, w // f))
        else:
            out = self._encode_tile(x, chunked, deterministic)
        mean, logvar = jnp.split(out.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents, *, chunked: bool = True, clamp: bool = True,
               deterministic: bool = True):
        """latents [B, T', h, w, z_dim] -> video [B, 1 + (T'-1) * temporal_factor, h*f, w*f,
        output_channels], float32, clamped to [-1, 1] like diffusers unless `clamp=False`."""
        _check_latents(latents, self.z_dim)
        x = latents.astype(self.dtype)
        h, w, f = x.shape[2], x.shape[3], self.coder_factor
        tile, stride = self._tile_sizes()
        # diffusers sizes decode tiles in latents by the full factor, outputs in patched pixels
        tile_l = (tile[0] // self.spatial_factor, tile[1] // self.spatial_factor)
        stride_l = (stride[0] // self.spatial_factor, stride[1] // self.spatial_factor)
        p = self.patch
        tile, stride = (tile[0] // p, tile[1] // p), (stride[0] // p, stride[1] // p)
        if self.use_tiling and (h > tile_l[0] or w > tile_l[1]):
            blend = (tile[0] - stride[0], tile[1] - stride[1])
            out = tiled_map(self._tile_scan("_decode_tile", chunked, deterministic), x, tile_l,
                            stride_l, blend, stride, (h * f, w * f))
        else:
            out = self._decode_tile(x, chunked, deterministic)
        out = out.astype(jnp.float32)
        if self.patch_size is not None:
            out = unpatchify(out, self.patch)
        return jnp.clip(out, -1.0, 1.0) if clamp else out

    def _encode_tile(self, x, chunked: bool, deterministic: bool):
        return self.quant_conv(run_in_chunks(self.encoder, x, ENCODE_CHUNK_FRAMES, deterministic,
                                             chunked))

    def _decode_tile(self, z, chunked: bool, deterministic: bool):
        return run_in_chunks(self.decoder, self.post_quant_conv(z), DECODE_CHUNK_FRAMES,
                             deterministic, chunked)

    def _tile_scan(self, method: str, chunked: bool, deterministic: bool):
        """tiles [n, B, T, h, w, C] -> outputs [n, ...], one tile at a time under `nn.scan`."""
        def body(module, carry, tile):
            return carry, getattr(module, method)(tile, chunked, deterministic)

        scan = nn.scan(body, variable_broadcast="params",
                       split_rngs={"params": False, "dropout": True})
        return lambda tiles: scan(self, (), tiles)[1]

    def _channels_rule(self) -> str:
        if self.patch_size is None:
            return f"in_channels={self.in_channels}"
        return f"in_channels={self.in_channels} / patch_size^2={self.patch ** 2}"

    def _tile_sizes(self):
        return ((self.tile_sample_min_height, self.tile_sample_min_width),
                (self.tile_sample_stride_height, self.tile_sample_stride_width))


def init_params(vae: WanVAE, rng):
    """Random parameters (boxed with their logical axes; `flax.core.meta.unbox` strips them),
    from a jitted init on one small frame (every parameter exists whatever the clip length).

    The draws use an "rbg" key derived from `rng`: XLA compiles one threefry kernel per tensor,
    which takes ~20 s on CPU for even a tiny VAE; rbg compiles in a fraction of that.
    """
    f = vae.spatial_factor
    video = jnp.zeros((1, 1, f, f, vae.video_channels), jnp.float32)
    seed = jax.random.bits(rng, (4,), jnp.uint32)

    @jax.jit
    def init(seed):
        return vae.init(jax.random.wrap_key_data(seed, impl="rbg"), video)["params"]
    return init(seed)


def _check_video(video, channels: int, factor: int, rule: str) -> None:
    if video.ndim != 5:
        raise ValueError(f"VAE encode expects video [B, T, H, W, C], got shape {video.shape}")
    _, t, h, w, c = video.shape
    if not jnp.issubdtype(video.dtype, jnp.floating):
        raise ValueError(f"VAE encode expects float pixels in [-1, 1], got dtype {video.dtype} "
                         "(uint8 frames: x / 127.5 - 1)")
    if c != channels:
        raise ValueError(f"VAE encode: video has {c} channels (last axis of shape {video.shape}), "
                         f"the VAE expects {channels} ({rule})")
    if t < 1 or (t - 1) % ENCODE_CHUNK_FRAMES:
        lower = 1 + ENCODE_CHUNK_FRAMES * max(0, (t - 1) // ENCODE_CHUNK_FRAMES)
        raise ValueError(f"VAE encode: {t} frames; expected 1 + 4k frames (1, 5, 9, 13, 17, ...), "
                         f"nearest valid: {lower} or {lower + ENCODE_CHUNK_FRAMES}")
    if h % factor or w % factor:
        raise ValueError(f"VAE encode: frame size {h}x{w} (HxW) must be a multiple of the VAE's "
                         f"spatial factor {factor}")


def _check_latents(latents, z_dim: int) -> None:
    if latents.ndim != 5:
        raise ValueError(f"VAE decode expects latents [B, T', H', W', C], got shape "
                         f"{latents.shape}")
    if latents.shape[-1] != z_dim:
        raise ValueError(f"VAE decode: latents have {latents.shape[-1]} channels (last axis of "
                         f"shape {latents.shape}), the VAE expects z_dim={z_dim}")


# ------------------------------------------------------------------- posterior and normalisation

def sample_posterior(rng, mean, logvar):
    """A draw from the diagonal Gaussian N(mean, exp(logvar))."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all but the batch axis -> [B]."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


def normalize_latents(latents, mean: Sequence[float], std: Sequence[float]):
    """Raw VAE latents [..., C] -> the unit-scale ones the DiT sees: (z - mean) / std per channel."""
    mean, std = _stats(latents, mean, std)
    return (latents - mean) / std


def denormalize_latents(latents, mean: Sequence[float], std: Sequence[float]):
    """Inverse of `normalize_latents`: z * std + mean per channel."""
    mean, std = _stats(latents, mean, std)
    return latents * std + mean


def _stats(latents, mean, std):
    if mean is None or std is None:
        raise ValueError("latents_mean/std are None: set config.vae.latents_mean and latents_std "
                         "(one value per latent channel) to normalise latents")
    mean, std = jnp.asarray(mean, latents.dtype), jnp.asarray(std, latents.dtype)
    if mean.shape != (latents.shape[-1],) or std.shape != (latents.shape[-1],):
        raise ValueError(f"latents_mean/std have shapes {mean.shape}/{std.shape}; latents "
                         f"{latents.shape} need one value per channel ({latents.shape[-1]})")
    return mean, std
