"""diffusers `AutoencoderKLWan` folders <-> vdit's `WanVAE` (module, params), both ways.

Our parameter tree mirrors diffusers' module tree: `encoder.down_blocks.3.conv1.weight` is
params["encoder"]["down_blocks_3"]["conv1"]["kernel"] (a numbered child `name.N` becomes `name_N`;
the conv inside a resampler's `nn.Sequential` is `resample.1` there and `resample` here). Layouts:
3D conv weights [O, I, kt, kh, kw] <-> kernels [kt, kh, kw, I, O]; 2D conv weights [O, I, kh, kw]
<-> [kh, kw, I, O] (attention's 1x1 to_qkv/proj are 2D convs); RMS-norm gammas [C, 1, 1(, 1)]
<-> [C].
"""

from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vdit.convert.safetensors_io import (
    check_class,
    check_names_and_shapes,
    read_config,
    read_tensors,
    write_folder,
)
from vdit.models.vae import WanVAE
from vdit.models.vae_config import diffusers_config, vae_from_config

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_NUMBERED = re.compile(r"(.+)_(\d+)")
_TO_TORCH = {5: (4, 3, 0, 1, 2), 4: (3, 2, 0, 1)}  # kernel ndim -> axes of the torch weight
_FROM_TORCH = {5: (2, 3, 4, 1, 0), 4: (2, 3, 1, 0)}


def torch_name(path: tuple[str, ...]) -> str:
    """('encoder', 'down_blocks_1', 'resample', 'kernel') -> 'encoder.down_blocks.1.resample.1.weight'."""
    parts = []
    for part in path[:-1]:
        match = _NUMBERED.fullmatch(part)
        if match:
            parts += [match[1], match[2]]
        elif part == "resample":
            parts += ["resample", "1"]
        else:
            parts.append(part)
    parts.append("weight" if path[-1] == "kernel" else path[-1])
    return ".".join(parts)


def _torch_shape(path: tuple[str, ...], shape: tuple) -> tuple:
    if path[-1] == "kernel":
        return tuple(shape[i] for i in _TO_TORCH[len(shape)])
    if path[-1] == "gamma":  # per-frame (2D) norms inside attention blocks have one axis less
        return (shape[0], 1, 1) if any(p.startswith("attentions") for p in path) else \
            (shape[0], 1, 1, 1)
    return tuple(shape)


def param_shapes(vae: WanVAE) -> dict[tuple[str, ...], tuple]:
    """Our parameter paths -> shapes, from an abstract init (no compute, no memory)."""
    f = vae.spatial_factor
    video = jax.ShapeDtypeStruct((1, 1, f, f, vae.video_channels), jnp.float32)
    abstract = jax.eval_shape(lambda v: vae.init(jax.random.key(0), v), video)
    params = flax.core.meta.unbox(abstract["params"])
    return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(params).items()}


def torch_shapes(vae: WanVAE) -> dict[str, tuple]:
    """Every tensor name of the diffusers checkpoint -> its shape."""
    return {torch_name(p): _torch_shape(p, s) for p, s in param_shapes(vae).items()}


def params_from_torch(vae: WanVAE, tensors: dict[str, np.ndarray], where: str) -> dict:
    """diffusers tensors -> our params pytree; errors name each missing/extra/mis-shaped one."""
    shapes = param_shapes(vae)
    check_names_and_shapes(tensors, {torch_name(p): _torch_shape(p, s)
                                     for p, s in shapes.items()}, where)
    flat = {}
    for path, shape in shapes.items():
        value = np.asarray(tensors[torch_name(path)], np.float32)
        if path[-1] == "kernel":
            value = value.transpose(_FROM_TORCH[value.ndim])
        flat[path] = value.reshape(shape)
    return flax.traverse_util.unflatten_dict(flat)


def params_to_torch(vae: WanVAE, params) -> dict[str, np.ndarray]:
    """Our params pytree (boxed or not) -> diffusers tensor names and layouts."""
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(params))
    shapes = param_shapes(vae)
    check_names_and_shapes({"/".join(p): np.asarray(v) for p, v in flat.items()},
                           {"/".join(p): s for p, s in shapes.items()}, "params")
    tensors = {}
    for path, value in flat.items():
        value = np.asarray(value, np.float32)
        if path[-1] == "kernel":
            value = value.transpose(_TO_TORCH[value.ndim])
        tensors[torch_name(path)] = value.reshape(_torch_shape(path, value.shape)
                                                  if path[-1] == "gamma" else value.shape)
    return tensors


def load_vae(path: str, **overrides) -> tuple[WanVAE, dict]:
    """A diffusers AutoencoderKLWan folder -> (WanVAE, float32 params). `overrides` set vdit knobs
    (e.g. dtype="bfloat16", use_tiling=True) or replace config values."""
    config = read_config(path)
    check_class(config, "AutoencoderKLWan", path)
    vae = vae_from_config(config, **overrides)
    return vae, params_from_torch(vae, read_tensors(path), path)


def save_vae(vae: WanVAE, params, out_dir: str) -> None:
    """Writes config.json + safetensors that `AutoencoderKLWan.from_pretrained(out_dir)` loads."""
    write_folder(out_dir, diffusers_config(vae), params_to_torch(vae, params), WEIGHTS_NAME)
