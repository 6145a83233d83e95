"""The VAE's configuration: checking a `WanVAE`'s fields, building one from `config.vae` (or a
diffusers config.json) and writing diffusers' config back.

`config.vae` uses diffusers' `AutoencoderKLWan` names (base_dim, z_dim, dim_mult, num_res_blocks,
attn_scales, temperal_downsample, dropout, latents_mean, latents_std, ...) plus vdit's knobs:
`dtype` (compute dtype name), `conv_impl` ("auto", "native" or "taps": how 3D convolutions
run) and spatial tiling (`use_tiling`, `tile_sample_min_height/width`,
`tile_sample_stride_height/width`, in pixels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp

from vdit.models.vae_blocks import CONV3D_IMPLS

# diffusers AutoencoderKLWan config names and the vdit-only knobs, in one list of allowed keys.
DIFFUSERS_FIELDS = (
    "base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
    "temperal_downsample", "dropout", "latents_mean", "latents_std", "is_residual", "in_channels",
    "out_channels", "patch_size", "scale_factor_temporal", "scale_factor_spatial")
VDIT_FIELDS = ("dtype", "conv_impl", "use_tiling", "tile_sample_min_height", "tile_sample_min_width",
               "tile_sample_stride_height", "tile_sample_stride_width")
_ELEMENT_TYPE = {"dim_mult": int, "attn_scales": float, "temperal_downsample": bool,
                 "latents_mean": float, "latents_std": float}
TUPLE_FIELDS = tuple(_ELEMENT_TYPE)
DTYPES = ("float32", "bfloat16", "float16")
# diffusers' encoder/decoder can run at most this many temporal 2x steps per 4-frame chunk.
MAX_TEMPORAL_DOWNSAMPLES = 2


def _positive(vae, names, minimum=1):
    for name in names:
        value = getattr(vae, name)
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"VAE config {name}={value!r}: expected an int >= {minimum}")


def check_fields(vae) -> None:
    """Validates a WanVAE's fields (lists become tuples); raises naming the key and the value."""
    for name in TUPLE_FIELDS:
        value = getattr(vae, name)
        if isinstance(value, list):
            object.__setattr__(vae, name, tuple(value))
    if vae.is_residual:
        raise ValueError("VAE config is_residual=True is the Wan2.2 VAE, which vdit does not "
                         "implement; only the Wan2.1 layout (is_residual=False) is supported")
    if vae.patch_size is not None:
        raise ValueError(f"VAE config patch_size={vae.patch_size!r} (Wan2.2's patchified VAE) is "
                         "not supported; expected None")
    if vae.attn_scales:
        raise ValueError(f"VAE config attn_scales={list(vae.attn_scales)!r}: attention inside the "
                         "down blocks is not supported (diffusers' Wan2.1 encoder cannot run it "
                         "either); expected []")
    _positive(vae, ("base_dim", "z_dim", "in_channels", "out_channels"))
    _positive(vae, ("num_res_blocks",), minimum=0)
    if vae.decoder_base_dim is not None:
        _positive(vae, ("decoder_base_dim",))
    if not vae.dim_mult or any(not isinstance(m, int) or m < 1 for m in vae.dim_mult):
        raise ValueError(f"VAE config dim_mult={vae.dim_mult!r}: expected positive ints")
    stages = len(vae.dim_mult) - 1
    if len(vae.temperal_downsample) != stages:
        raise ValueError(f"VAE config temperal_downsample={list(vae.temperal_downsample)!r} has "
                         f"{len(vae.temperal_downsample)} entries; dim_mult={list(vae.dim_mult)!r}"
                         f" has {stages} downsampling stages, so expected {stages}")
    if sum(bool(t) for t in vae.temperal_downsample) > MAX_TEMPORAL_DOWNSAMPLES:
        raise ValueError(f"VAE config temperal_downsample={list(vae.temperal_downsample)!r}: at "
                         f"most {MAX_TEMPORAL_DOWNSAMPLES} temporal downsamples fit a 4-frame chunk")
    if vae.conv_impl not in CONV3D_IMPLS:
        raise ValueError(f"VAE config conv_impl={vae.conv_impl!r}; allowed: {list(CONV3D_IMPLS)}")
    if not 0.0 <= float(vae.dropout) < 1.0:
        raise ValueError(f"VAE config dropout={vae.dropout!r}: expected 0 <= dropout < 1")
    _check_tiles(vae)


def _check_tiles(vae) -> None:
    _positive(vae, ("tile_sample_min_height", "tile_sample_min_width",
                    "tile_sample_stride_height", "tile_sample_stride_width"))
    for side in ("height", "width"):
        size = getattr(vae, f"tile_sample_min_{side}")
        stride = getattr(vae, f"tile_sample_stride_{side}")
        if stride > size:
            raise ValueError(f"VAE config tile_sample_stride_{side}={stride} exceeds "
                             f"tile_sample_min_{side}={size}: tiles would leave gaps")


def vae_from_config(cfg: Mapping, **overrides):
    """`config.vae` (a ConfigDict or mapping) -> WanVAE. Unknown keys are errors naming the key;
    keys starting with '_' (diffusers' bookkeeping such as `_class_name`) are skipped."""
    from vdit.models.vae import WanVAE  # the module imports this file for check_fields

    values = {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")}
    values.update(overrides)
    unknown = sorted(set(values) - set(DIFFUSERS_FIELDS) - set(VDIT_FIELDS))
    if unknown:
        raise ValueError(f"unknown VAE config keys {unknown}; allowed: "
                         f"{sorted(DIFFUSERS_FIELDS + VDIT_FIELDS)}")
    for name in TUPLE_FIELDS:
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    if "dtype" in values:
        name = values["dtype"]
        if isinstance(name, str) and name not in DTYPES:
            raise ValueError(f"VAE config dtype={name!r}; allowed: {list(DTYPES)}")
        values["dtype"] = jnp.dtype(name)
    for name in ("scale_factor_temporal", "scale_factor_spatial"):
        if values.get(name, 0) is None:  # diffusers allows null here; keep our default
            values.pop(name)
    return WanVAE(**values)


def diffusers_config(vae) -> dict:
    """The config.json that `AutoencoderKLWan.from_pretrained` reads for this module."""
    fields = {f.name for f in dataclasses.fields(vae)}
    config = {"_class_name": "AutoencoderKLWan"}
    for name in DIFFUSERS_FIELDS:
        if name not in fields:
            continue
        value = getattr(vae, name)
        if name in ("latents_mean", "latents_std") and value is None:
            continue  # diffusers then uses Wan2.1's 16-channel defaults
        config[name] = [_ELEMENT_TYPE[name](v) for v in value] if name in TUPLE_FIELDS else value
    return config
