"""Checks of a `WanVAE`'s fields (run by the module itself when it is built) and the names of
the fields `config.vae` may hold: diffusers' `AutoencoderKLWan` names plus vdit's knobs (see
`vdit/models/vae_config.py`). Errors name the key and the value.
"""

from __future__ import annotations

import warnings

from vdit.models.vae_blocks import CONV3D_IMPLS

# diffusers AutoencoderKLWan config names and the vdit-only knobs, in one list of allowed keys.
DIFFUSERS_FIELDS = (
    "base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
    "temperal_downsample", "dropout", "latents_mean", "latents_std", "is_residual", "in_channels",
    "out_channels", "patch_size", "scale_factor_temporal", "scale_factor_spatial")
# Keys some published config.json files carry that diffusers' AutoencoderKLWan ignores (it warns
# and always clamps decoded video to [-1, 1]): Wan2.2-TI2V-5B's vae/ has "clip_output": false.
IGNORED_DIFFUSERS_FIELDS = ("clip_output",)
VDIT_FIELDS = ("dtype", "conv_impl", "use_tiling", "tile_sample_min_height", "tile_sample_min_width",
               "tile_sample_stride_height", "tile_sample_stride_width")
ELEMENT_TYPE = {"dim_mult": int, "attn_scales": float, "temperal_downsample": bool,
                 "latents_mean": float, "latents_std": float}
TUPLE_FIELDS = tuple(ELEMENT_TYPE)
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
    _check_attn_scales(vae)
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
    _check_patch(vae)
    if vae.is_residual:
        _check_residual(vae)
    _check_scale_factors(vae)
    _check_tiles(vae)


def _check_attn_scales(vae) -> None:
    """diffusers' encoder puts attention in the down stage at scale 2^-i (i < len(dim_mult)) when
    that scale is listed, and its decoder never does; a listed scale no stage has builds
    nothing there, and the residual (Wan2.2) encoder never reads the list, so both are accepted."""
    if vae.is_residual:
        return
    reached = [s for s in vae.attn_scales if any(float(s) == 2.0 ** -i
                                                 for i in range(len(vae.dim_mult)))]
    if reached:
        raise ValueError(f"VAE config attn_scales={list(vae.attn_scales)!r}: attention inside the "
                         f"down blocks at scales {reached} is not supported (diffusers' Wan "
                         "encoder cannot run it either); expected none of the scales "
                         f"{[2.0 ** -i for i in range(len(vae.dim_mult))]}")


def _check_scale_factors(vae) -> None:
    """diffusers' Wan pipelines size latents by `scale_factor_*`, vdit by the architecture; its
    encode and decode never read them, and `AutoencoderKLWan` saves its defaults (8, 4) whatever
    the architecture, so a contradiction is said, not refused."""
    for name, derived, source in (
            ("scale_factor_spatial", vae.spatial_factor,
             f"dim_mult={list(vae.dim_mult)} with patch_size={vae.patch_size}"),
            ("scale_factor_temporal", vae.temporal_factor,
             f"temperal_downsample={list(vae.temperal_downsample)}")):
        value = getattr(vae, name)
        if value is not None and value != derived:
            warnings.warn(f"VAE config {name}={value!r} contradicts the architecture: {source} "
                          f"compresses {derived}x; vdit sizes latents by {derived}", stacklevel=2)


def _check_patch(vae) -> None:
    if vae.patch_size is None:
        return
    _positive(vae, ("patch_size",))
    for name in ("in_channels", "out_channels"):
        channels = getattr(vae, name)
        if channels % vae.patch_size ** 2:
            raise ValueError(f"VAE config {name}={channels} with patch_size={vae.patch_size}: the "
                             f"patched frames have (video channels) * {vae.patch_size ** 2} "
                             "channels, so expected a multiple of patch_size^2")


def _check_residual(vae) -> None:
    """The Wan2.2 shortcuts fold/unfold space-time blocks into channels: widths must divide."""
    dims = [vae.base_dim * m for m in (1, *vae.dim_mult)]
    last = len(vae.dim_mult) - 1
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        factor = (2 if i != last and vae.temperal_downsample[i] else 1) * (4 if i != last else 1)
        if cin * factor % cout:
            raise ValueError(f"VAE config is_residual=True: encoder stage {i} goes {cin} -> {cout} "
                             f"channels; its shortcut needs {cin} * {factor} divisible by {cout} "
                             f"(base_dim={vae.base_dim}, dim_mult={list(vae.dim_mult)})")
    base = vae.decoder_base_dim or vae.base_dim
    dims = [base * m for m in (vae.dim_mult[-1], *vae.dim_mult[::-1])]
    up = vae.temperal_downsample[::-1]
    for i, (cin, cout) in enumerate(zip(dims[:-2], dims[1:-1])):
        factor = (2 if up[i] else 1) * 4
        if cout * factor % cin:
            raise ValueError(f"VAE config is_residual=True: decoder stage {i} goes {cin} -> "
                             f"{cout} channels; its shortcut needs {cout} * {factor} divisible by "
                             f"{cin} (decoder_base_dim={base}, dim_mult={list(vae.dim_mult)})")


def _check_tiles(vae) -> None:
    _positive(vae, ("tile_sample_min_height", "tile_sample_min_width",
                    "tile_sample_stride_height", "tile_sample_stride_width"))
    for side in ("height", "width"):
        size = getattr(vae, f"tile_sample_min_{side}")
        stride = getattr(vae, f"tile_sample_stride_{side}")
        if stride > size:
            raise ValueError(f"VAE config tile_sample_stride_{side}={stride} exceeds "
                             f"tile_sample_min_{side}={size}: tiles would leave gaps")
        # tiles are cut in latents (pixels // factor): a remainder would be dropped
        for name, value in ((f"tile_sample_min_{side}", size),
                            (f"tile_sample_stride_{side}", stride)):
            if value % vae.spatial_factor:
                raise ValueError(f"VAE config {name}={value}: expected a multiple of the VAE's "
                                 f"spatial factor {vae.spatial_factor}")
