"""diffusers WanTransformer3DModel folders <-> vdit `WanDiT` (module, params), both directions.

`load_transformer(path)` reads config.json + safetensors; `save_transformer(module, params, out)`
writes a folder that `WanTransformer3DModel.from_pretrained` loads. Layout changes:
  Linear `weight [out, in]`           <-> Dense `kernel [*in, *out]` (e.g. to_q `[D, H, Dh]`)
  Conv3d patch `weight [D, C, pt, ph, pw]` <-> `kernel [pt*ph*pw*C, D]` (token order of patches.py)
  per-block tensors `blocks.{i}.*`    <-> one stacked leaf with a leading `num_layers` axis (nn.scan)
  `scale_shift_table [1, n, D]`       <-> `[n, D]`; norm weights/biases over heads `[H*Dh]` <-> `[H, Dh]`
Image-conditioned (I2V) models add `condition_embedder.image_embedder.*` (its `pos_embed
[1, N, D_img]` <-> `[N, D_img]`) and per block `attn2.add_k_proj/add_v_proj/norm_added_k`; the
`norm_added_q` tensors some checkpoints carry are unused by the model (as diffusers ignores them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdit.convert.safetensors_io import (
    check_class,
    check_names_and_shapes,
    read_config,
    read_tensors,
    write_folder,
)
from vdit.models.dit import VDIT_KEYS, WanDiT, build_dit

DIFFUSERS_CLASS = "WanTransformer3DModel"
DIFFUSERS_VERSION = "0.35.0"  # recorded in written config.json files
DIFFUSERS_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels",
                  "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm",
                  "qk_norm", "eps", "image_dim", "added_kv_proj_dim", "rope_max_seq_len",
                  "pos_embed_seq_len")


# Tensors some I2V checkpoints carry that the model never reads (diffusers ignores them too).
_UNUSED = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.(weight|bias)")


def _linear(ours: str, torch: str, in_dims: int = 1) -> list[tuple[str, str, str]]:
    return [(f"{ours}/kernel", f"{torch}.weight", f"linear{in_dims}"),
            (f"{ours}/bias", f"{torch}.bias", "flat")]


def _image_rules(model: WanDiT) -> list[tuple[str, str, str]]:
    if not model.has_image_branch:
        return []
    ie = "condition_embedder.image_embedder"
    rules = [("image_embedder/norm1/scale", f"{ie}.norm1.weight", "flat"),
             ("image_embedder/norm1/bias", f"{ie}.norm1.bias", "flat"),
             *_linear("image_embedder/ff/linear_1", f"{ie}.ff.net.0.proj"),
             *_linear("image_embedder/ff/linear_2", f"{ie}.ff.net.2"),
             ("image_embedder/norm2/scale", f"{ie}.norm2.weight", "flat"),
             ("image_embedder/norm2/bias", f"{ie}.norm2.bias", "flat")]
    if model.pos_embed_seq_len:
        rules.append(("image_embedder/pos_embed", f"{ie}.pos_embed", "table"))
    return rules


def _top_rules(model: WanDiT) -> list[tuple[str, str, str]]:
    """(our '/'-path, diffusers name, kind) for the non-block tensors."""
    ce = "condition_embedder"
    return _image_rules(model) + [("patch_embedding/kernel", "patch_embedding.weight", "patch"),
            ("patch_embedding/bias", "patch_embedding.bias", "flat"),
            *_linear("time_embedder/linear_1", f"{ce}.time_embedder.linear_1"),
            *_linear("time_embedder/linear_2", f"{ce}.time_embedder.linear_2"),
            *_linear("time_proj", f"{ce}.time_proj"),
            *_linear("text_embedder/linear_1", f"{ce}.text_embedder.linear_1"),
            *_linear("text_embedder/linear_2", f"{ce}.text_embedder.linear_2"),
            ("scale_shift_table", "scale_shift_table", "table"),
            *_linear("proj_out", "proj_out")]


def _block_rules(cross_attn_norm: bool, image: bool = False) -> list[tuple[str, str, str]]:
    """Rules for one block; our paths are under `blocks/`, diffusers' under `blocks.{i}.`;
    `image`: the image tokens' own k/v projections (added_kv_proj_dim set)."""
    rules = []
    if image:
        for proj in ("add_k_proj", "add_v_proj"):
            rules += _linear(f"attn2/{proj}", f"attn2.{proj}")
        rules.append(("attn2/norm_added_k/scale", "attn2.norm_added_k.weight", "flat"))
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v"):
            rules += _linear(f"{attn}/{proj}", f"{attn}.{proj}")
        rules += _linear(f"{attn}/to_out", f"{attn}.to_out.0", in_dims=2)
        rules += [(f"{attn}/norm_q/scale", f"{attn}.norm_q.weight", "flat"),
                  (f"{attn}/norm_k/scale", f"{attn}.norm_k.weight", "flat")]
    if cross_attn_norm:
        rules += [("norm2/scale", "norm2.weight", "flat"), ("norm2/bias", "norm2.bias", "flat")]
    rules += [*_linear("ffn/linear_1", "ffn.net.0.proj"), *_linear("ffn/linear_2", "ffn.net.2"),
              ("scale_shift_table", "scale_shift_table", "table")]
    return rules


def _torch_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    if kind.startswith("linear"):
        n = int(kind[len("linear"):])
        return (math.prod(ours[n:]), math.prod(ours[:n]))
    if kind == "table":
        return (1,) + ours
    return (math.prod(ours),)


def to_ours(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind.startswith("linear"):
        return w.T.reshape(shape)
    if kind == "patch":  # [D, C, pt, ph, pw] -> [pt, ph, pw, C, D] -> tokens x D
        return w.transpose(2, 3, 4, 1, 0).reshape(shape)
    return w.reshape(shape)


def to_torch(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind.startswith("linear"):
        return x.reshape(shape[::-1]).T
    if kind == "patch":
        d, c, pt, ph, pw = shape
        return x.reshape(pt, ph, pw, c, d).transpose(4, 3, 0, 1, 2)
    return x.reshape(shape)


def _our_shapes(model: WanDiT) -> dict[str, tuple[int, ...]]:
    """'/'-joined param path -> shape, without allocating (eval_shape of init)."""
    pt, ph, pw = model.patch_size
    latents = jnp.zeros((1, pt, ph, pw, model.in_channels))
    image = None
    if model.has_image_branch:
        image = jnp.zeros((1, model.pos_embed_seq_len or 1, model.image_dim))
    tree = jax.eval_shape(lambda: nn.unbox(model.init(
        jax.random.key(0), latents, jnp.zeros((1,)), jnp.zeros((1, 1, model.text_dim)), image)))
    flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def tensor_plan(model: WanDiT):
    """Yields (our path, diffusers name, kind, our shape, torch shape, layer or None)."""
    shapes = _our_shapes(model)
    pt, ph, pw = model.patch_size
    for ours, torch, kind in _top_rules(model):
        shape = shapes[ours]
        tshape = ((shape[1], model.in_channels, pt, ph, pw) if kind == "patch"
                  else _torch_shape(kind, shape))
        yield ours, torch, kind, shape, tshape, None
    for ours, torch, kind in _block_rules(model.cross_attn_norm,
                                          model.added_kv_proj_dim is not None):
        shape = shapes[f"blocks/{ours}"][1:]
        for i in range(model.num_layers):
            yield f"blocks/{ours}", f"blocks.{i}.{torch}", kind, shape, _torch_shape(kind, shape), i


def diffusers_config(model: WanDiT) -> dict:
    """The config.json dict diffusers' WanTransformer3DModel expects for `model`."""
    cfg = {k: getattr(model, k) for k in DIFFUSERS_KEYS}
    cfg["patch_size"] = list(model.patch_size)
    return {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION, **cfg}


def model_config_from_diffusers(cfg: dict, **vdit_knobs) -> ml_collections.ConfigDict:
    """`config.model` section from a diffusers config.json dict (+ the vdit knobs of VDIT_KEYS)."""
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in DIFFUSERS_KEYS)
    if unknown:
        raise ValueError(f"transformer config.json has keys vdit does not know: {unknown}")
    bad = sorted(set(vdit_knobs) - set(VDIT_KEYS))
    if bad:
        raise ValueError(f"unknown vdit model options {bad}; allowed: {VDIT_KEYS}")
    model = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if "out_channels" not in model:  # diffusers' default, as from_pretrained reads it
        model["out_channels"] = WanDiT.out_channels
    if model["out_channels"] is None:  # null: diffusers uses in_channels
        model["out_channels"] = model.get("in_channels", WanDiT.in_channels)
    return ml_collections.ConfigDict({**model, **vdit_knobs})


def params_from_diffusers(model: WanDiT, tensors: dict[str, np.ndarray], where: str) -> dict:
    """diffusers state dict (numpy) -> nested vdit params; mismatches are named by tensor."""
    plan = list(tensor_plan(model))
    tensors = {k: v for k, v in tensors.items() if not _UNUSED.fullmatch(k)}
    check_names_and_shapes(tensors, {t: ts for _, t, _, _, ts, _ in plan}, where)
    flat: dict[str, np.ndarray] = {}
    for ours, torch, kind, shape, _, layer in plan:
        value = to_ours(kind, np.asarray(tensors[torch], np.float32), shape)
        if layer is None:
            flat[ours] = value
        else:
            flat.setdefault(ours, np.empty((model.num_layers,) + shape, np.float32))[layer] = value
    nested: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def params_to_diffusers(model: WanDiT, params) -> dict[str, np.ndarray]:
    """Nested vdit params -> diffusers state dict (float32 numpy). Weights diffusers has no place
    for (micro-conditioning, unmerged LoRA factors) are an error, never silently dropped."""
    if model.micro_conditioning:
        raise ValueError(f"model.micro_conditioning={list(model.micro_conditioning)}: diffusers' "
                         "WanTransformer3DModel has no micro-conditioning, so an export would drop "
                         "micro_embedder and change the model's output")
    params = nn.unbox(params)
    plan = list(tensor_plan(model))
    used = {ours for ours, *_ in plan}
    leftover = sorted(p for p in _flat_paths(params) if p not in used)
    if leftover:
        raise ValueError(f"params {leftover[:8]} have no diffusers tensor; merge LoRA factors "
                         "(vdit.models.lora) before exporting")
    out = {}
    for ours, torch, kind, _, tshape, layer in plan:
        node = params
        for p in ours.split("/"):
            node = node[p]
        value = np.asarray(jax.device_get(node), np.float32)
        out[torch] = to_torch(kind, value if layer is None else value[layer], tshape)
    return out


def _flat_paths(tree, prefix: str = "") -> list[str]:
    """"a/b/c" paths of a nested params dict's leaves."""
    if not isinstance(tree, Mapping):
        return [prefix]
    return [p for k, v in tree.items() for p in _flat_paths(v, f"{prefix}/{k}" if prefix else k)]


def load_transformer(path: str, **vdit_knobs) -> tuple[WanDiT, dict]:
    """A diffusers WanTransformer3DModel folder -> (WanDiT, params as numpy float32)."""
    config = read_config(path)
    check_class(config, DIFFUSERS_CLASS, path)
    model = build_dit(model_config_from_diffusers(config, **vdit_knobs))
    return model, params_from_diffusers(model, read_tensors(path), path)


def save_transformer(model: WanDiT, params, out_dir: str) -> None:
    """Writes config.json + diffusion_pytorch_model.safetensors in diffusers' layout."""
    write_folder(out_dir, diffusers_config(model), params_to_diffusers(model, params))
