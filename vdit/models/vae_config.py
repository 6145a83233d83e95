"""The VAE's configuration: building a `WanVAE` from `config.vae` (or a diffusers config.json)
and writing diffusers' config back (the fields' checks: `vdit/models/vae_fields.py`).

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

from vdit.models.vae import WanVAE
from vdit.models.vae_fields import (
    DIFFUSERS_FIELDS,
    DTYPES,
    ELEMENT_TYPE,
    IGNORED_DIFFUSERS_FIELDS,
    TUPLE_FIELDS,
    VDIT_FIELDS,
)


def vae_from_config(cfg: Mapping, **overrides):
    """`config.vae` (a ConfigDict or mapping) -> WanVAE. Unknown keys are errors naming the key;
    keys starting with '_' (diffusers' bookkeeping such as `_class_name`) and the config.json keys
    diffusers ignores (`IGNORED_DIFFUSERS_FIELDS`) are skipped."""
    values = {k: v for k, v in dict(cfg).items()
              if not str(k).startswith("_") and k not in IGNORED_DIFFUSERS_FIELDS}
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
        if name == "scale_factor_spatial":
            value = vae.spatial_factor  # what the pipelines must size latents by
        if name == "scale_factor_temporal":
            value = vae.temporal_factor
        config[name] = [ELEMENT_TYPE[name](v) for v in value] if name in TUPLE_FIELDS else value
    return config
