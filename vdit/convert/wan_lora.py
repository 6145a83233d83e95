"""LoRA files for Wan DiTs in the formats diffusers reads <-> vdit's DiT weights.

Reading (`read_lora` + `merge_lora_file`): one .safetensors file for a WanTransformer3DModel, in
  - diffusers / peft names (what `pipe.save_lora_weights` writes), with or without the
    "transformer." prefix: "blocks.0.attn1.to_q.lora_A.weight" [r, in], "...lora_B.weight"
    [out, r], optional "...lora_B.bias" [out] (peft's lora_bias). The scale is 1 (alpha = rank,
    diffusers' rule for files without alphas) unless the file's `lora_adapter_metadata` (a peft
    LoraConfig that diffusers saves) says otherwise: lora_alpha, alpha_pattern, use_rslora.
  - the original Wan names that ComfyUI and most published Wan LoRAs use:
    "diffusion_model.blocks.0.self_attn.q.lora_down.weight" (or lora_A), "...lora_up.weight"
    (or lora_B), "....alpha" (scale alpha / r), "....diff_b" (a bias delta) and "....diff" (a
    whole-tensor delta: weights, norms, modulation tables);
  - musubi-tuner's: the same with "lora_unet_" and "_" for "." ("lora_unet_blocks_0_self_attn_q");
  - vdit's own (OUT/adapter.safetensors of `vdit export --adapter`, "blocks/attn1/to_q/kernel/a"),
    scaled by the alpha / rank of the adapter_config.json beside it: read as the
    pytorch_lora_weights.safetensors the same export writes (`from_vdit_adapter`). `lora_file`
    takes such a folder too and picks that file.
A tensor with NaN or inf values is an error naming it.
A Conv3d (patch_embedding) adapter is A [r, C, pt, ph, pw] with B [D, r, 1, 1, 1], as peft keeps it.
Merging adds, to each tensor in vdit's layout (the mapping of vdit/convert/wan_dit.py):
    weight += (B @ A) * scale * strength,  bias += bias_delta * scale * strength,
    tensor += diff * strength
which is what diffusers' `load_lora_weights` + `fuse_lora(lora_scale=strength)` computes, except
where diffusers drops part of an original-format file (`.diff` on layers other than the output
head, `.diff_b` on norms, time_projection bias deltas without its weight) and vdit applies it, as
the original Wan code and ComfyUI do. Any key this does not understand (DoRA magnitudes, another
model's layers) is an error naming it: nothing is dropped.

Writing (`adapter_to_diffusers`): a vdit adapter tree (vdit/models/lora.py) -> diffusers / peft
names with the "transformer." prefix and alpha / rank folded into lora_B, so the file loads at
scale 1 with `pipe.load_lora_weights(folder)` (`load_into_transformer_2=True` for a Wan2.2
low-noise expert's file).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct

import jax
import numpy as np
from flax import traverse_util

from vdit import runs
from vdit.convert.safetensors_io import load_safetensors, read_json_dict
from vdit.convert.wan_dit import tensor_plan, to_ours, to_torch
from vdit.models.dit import WanDiT

DIFFUSERS_PREFIX = "transformer."
ORIGINAL_PREFIX = "diffusion_model."
MUSUBI_PREFIX = "lora_unet_"  # musubi-tuner's names: the original ones with "_" for "."
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
ADAPTER_CONFIG = "adapter_config.json"  # beside a `vdit export --adapter` file: rank, alpha
PEFT_DEFAULT_ALPHA = 8  # peft's LoraConfig.lora_alpha when a saved config leaves it out
# original Wan module names -> diffusers' (per block, then top level)
_BLOCK_NAMES = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k",
                "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
                "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
                "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
                "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
                "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
                "cross_attn.norm_k_img": "attn2.norm_added_k",
                "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
                "modulation": "scale_shift_table"}
_TOP_NAMES = {"patch_embedding": "patch_embedding", "head.head": "proj_out",
              "head.modulation": "scale_shift_table",
              "text_embedding.0": "condition_embedder.text_embedder.linear_1",
              "text_embedding.2": "condition_embedder.text_embedder.linear_2",
              "time_embedding.0": "condition_embedder.time_embedder.linear_1",
              "time_embedding.2": "condition_embedder.time_embedder.linear_2",
              "time_projection.1": "condition_embedder.time_proj",
              "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
              "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
              "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
              "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
              "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}
# the suffix of each key kind, in both spellings
_PARTS = {"lora_A.weight": "a", "lora_down.weight": "a", "lora_B.weight": "b",
          "lora_up.weight": "b", "lora_B.bias": "bias", "diff_b": "bias", "alpha": "alpha",
          "diff": "diff"}
_BARE_TENSORS = ("scale_shift_table", "pos_embed")  # diffusers names without .weight


def read_metadata(path) -> dict:
    """The transformer's peft LoraConfig that diffusers stores in a LoRA file's header, or {}."""
    with runs.user_path(path).open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        metadata = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"LoRA file {os.fspath(path)!r}: its {METADATA_KEY} is not JSON ({e})") from e
    if not isinstance(metadata, dict):
        raise ValueError(f"LoRA file {os.fspath(path)!r}: its {METADATA_KEY} holds a JSON "
                         f"{type(metadata).__name__}; expected an object (a peft LoraConfig)")
    # a pipeline's save_lora_weights prefixes each key with the component ("transformer.r")
    prefixed = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in metadata.items()
                if k.startswith(DIFFUSERS_PREFIX)}
    return prefixed or metadata


def check_file(path: str, what: str):
    """The path of an existing .safetensors LoRA file; errors start with `what` (a flag)."""
    file = runs.check_reachable(path, what)
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"{what} {path!r}: expected a .safetensors file (pickled .pt / .bin "
                         "files are not read)")
    if not file.is_file():
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    return file


def lora_file(path: str, what: str, expert: str = "high") -> str:
    """The LoRA file `path` names, checked (`check_file`): the file itself, or in a folder that
    `vdit export --adapter` wrote, the diffusers-format file its adapter_config.json lists for
    `expert` ("high": the DiT, "low": a two-expert model's dit_2)."""
    folder = runs.check_reachable(path, what)
    if folder.is_dir() and (folder / ADAPTER_CONFIG).is_file():
        written = read_json_dict(folder / ADAPTER_CONFIG).get("diffusers")
        key = "lora_2" if expert == "low" else "lora"
        if not isinstance(written, dict) or key not in written:
            raise ValueError(f"{what} {path!r}: this adapter folder has no diffusers-format file "
                             f"for {key} ({written or 'none listed'} in {ADAPTER_CONFIG})")
        path = str(folder / written[key])
    elif folder.is_dir():
        raise ValueError(f"{what} {path!r} is a folder: give a .safetensors LoRA file (or a "
                         f"folder `vdit export --adapter` wrote, with its {ADAPTER_CONFIG})")
    check_file(path, what)
    return path


def read_lora(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors as float32 numpy, diffusers metadata) of a LoRA .safetensors file; a tensor with
    NaN or inf values (a diverged or damaged file, which would blacken every video) is an error
    naming it."""
    file = check_file(path, "LoRA file")
    tensors = {k: np.asarray(v, np.float32) for k, v in load_safetensors(file).items()}
    if not tensors:
        raise ValueError(f"LoRA file {path!r} holds no tensors")
    bad = [k for k, v in sorted(tensors.items()) if not np.isfinite(v).all()]
    if bad:
        count = int(np.size(tensors[bad[0]]) - np.isfinite(tensors[bad[0]]).sum())
        others = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(f"LoRA file {path!r}: tensor {bad[0]!r} holds {count} NaN or inf "
                         f"values{others}; the file is damaged or was saved from a diverged run: "
                         "use an earlier or re-exported file")
    return tensors, read_metadata(file)


def _is_vdit_adapter(tensors) -> bool:
    """Whether the keys are vdit's own adapter names ("blocks/attn1/to_q/kernel/a")."""
    return all(re.fullmatch(r"[^.]+/[ab]", k) for k in tensors)


def from_vdit_adapter(model: WanDiT, tensors: dict[str, np.ndarray], path: str):
    """A vdit adapter file (OUT/adapter.safetensors of `vdit export --adapter`) as diffusers /
    peft tensors, with the scale alpha / rank of the adapter_config.json beside it folded in:
    what the same export wrote to pytorch_lora_weights.safetensors."""
    config_path = runs.user_path(path).parent / ADAPTER_CONFIG
    other = "give the pytorch_lora_weights.safetensors that `vdit export --adapter` wrote with it"
    if not config_path.is_file():
        raise ValueError(f"LoRA file {path!r} holds vdit adapter names but no {ADAPTER_CONFIG} "
                         f"(rank, alpha) is beside it: {other}")
    if any(k.startswith("dit_2/") for k in tensors):
        raise ValueError(f"LoRA file {path!r} holds a two-expert model's adapters (dit_2/ "
                         "keys): give the diffusers files the same export wrote, "
                         "pytorch_lora_weights.safetensors (high-noise expert) to --lora and "
                         "pytorch_lora_weights_2.safetensors (low-noise) to --lora-2")
    config = read_json_dict(config_path)
    try:
        scale = float(config["alpha"]) / int(config["rank"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{os.fspath(config_path)!r}: expected a rank and an alpha ({e}); "
                         f"{other}") from e
    return adapter_to_diffusers(model, traverse_util.unflatten_dict(tensors, sep="/"), scale)


def _format(tensors) -> tuple[str, str]:
    """(naming, key prefix) of a LoRA file: "diffusers", "original" (Wan's own names, with or
    without "diffusion_model.") or "musubi"."""
    for naming, prefix in (("original", ORIGINAL_PREFIX), ("musubi", MUSUBI_PREFIX)):
        if any(k.startswith(prefix) for k in tensors):
            return naming, prefix
    if any(re.match(r"blocks\.\d+\.(self_attn|cross_attn|ffn\.\d)\.", k) for k in tensors):
        return "original", ""
    return "diffusers", DIFFUSERS_PREFIX


def _split(key: str) -> tuple[str, str] | None:
    """(module name, part) of a LoRA key, e.g. ("blocks.0.attn1.to_q", "a"); None if unknown."""
    for suffix, part in _PARTS.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], part
    return None


def _diffusers_module(name: str, naming: str) -> str:
    """A module's diffusers name (original Wan and musubi-tuner names translated)."""
    if naming == "diffusers":
        return name
    sep = "_" if naming == "musubi" else "."
    blocks = {k.replace(".", sep): v for k, v in _BLOCK_NAMES.items()}
    match = re.fullmatch(rf"blocks{re.escape(sep)}(\d+){re.escape(sep)}(.+)", name)
    if match and match.group(2) in blocks:
        return f"blocks.{match.group(1)}.{blocks[match.group(2)]}"
    return {k.replace(".", sep): v for k, v in _TOP_NAMES.items()}.get(name, name)


def _alpha_for(module: str, metadata: dict) -> float | None:
    """lora_alpha of `module` under a peft LoraConfig (alpha_pattern first, as peft matches it)."""
    for pattern, alpha in (metadata.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    if not metadata:
        return None  # no LoraConfig: alpha = rank (scale 1), diffusers' rule
    return float(metadata.get("lora_alpha", PEFT_DEFAULT_ALPHA))


# One term of a tensor's delta: ("product", A, B, factor) is (B @ A) * factor, ("add", X, factor)
# is X * factor. Products are formed one tensor at a time when merged: a rank-64 LoRA on a 14B
# DiT has a few GB of factors but tens of GB of products.
Term = tuple


def lora_terms(tensors: dict[str, np.ndarray], metadata: dict, strength: float,
               where: str) -> dict[str, list[Term]]:
    """diffusers tensor name ("blocks.0.attn1.to_q.weight") -> the terms of its delta (torch
    layout); errors name the keys that cannot be applied."""
    naming, prefix = _format(tensors)
    if metadata.get("use_dora"):
        raise ValueError(f"LoRA file {where!r} is a DoRA adapter (use_dora): not supported")
    modules: dict[str, dict[str, np.ndarray]] = {}
    unknown, seen = [], {}
    for key, value in sorted(tensors.items()):
        split = _split(key.removeprefix(prefix))
        if split is None:
            unknown.append(key)
            continue
        module, part = split
        module = _diffusers_module(module, naming)
        if (module, part) in seen:  # e.g. lora_A beside lora_down, or two prefixes
            raise ValueError(f"LoRA file {where!r}: keys {seen[module, part]!r} and {key!r} "
                             "are the same tensor of the same layer; which one applies is unclear")
        seen[module, part] = key
        modules.setdefault(module, {})[part] = value
    if unknown:
        raise ValueError(f"LoRA file {where!r} has keys vdit does not know how to apply "
                         f"({len(unknown)}, e.g. {sorted(unknown)[:5]}); it reads diffusers / peft "
                         "names (lora_A, lora_B), the original Wan names (lora_down, lora_up, "
                         "alpha, diff, diff_b) and musubi-tuner's (lora_unet_...)")
    terms: dict[str, list[Term]] = {}
    for module, parts in sorted(modules.items()):
        weight = module if module.rsplit(".", 1)[-1] in _BARE_TENSORS else module + ".weight"
        if ("a" in parts) != ("b" in parts):
            raise ValueError(f"LoRA file {where!r}: {module} has only one of its two factors "
                             f"({sorted(parts)})")
        if "alpha" in parts and "a" not in parts:
            raise ValueError(f"LoRA file {where!r}: {module} has an alpha but no factors")
        scale = 1.0
        if "a" in parts:
            a, b = parts["a"], parts["b"]
            rank = a.shape[0]
            if b.ndim < 2 or b.shape[1] != rank:
                raise ValueError(f"LoRA file {where!r}: {module} factors do not chain: A "
                                 f"{a.shape}, B {b.shape} (expected A [r, ...], B [out, r, ...])")
            if "alpha" in parts:  # the original format's alpha scales the factors, not diff_b
                factor = float(parts["alpha"].reshape(-1)[0]) / rank
            else:
                alpha = _alpha_for(module, metadata)
                if alpha is not None:
                    scale = alpha / (math.sqrt(rank) if metadata.get("use_rslora") else rank)
                factor = scale
            terms.setdefault(weight, []).append(("product", a, b, factor * strength))
        if "bias" in parts:  # peft scales lora_B's bias with the module's scale
            terms.setdefault(module + ".bias", []).append(("add", parts["bias"], scale * strength))
        if "diff" in parts:
            terms.setdefault(weight, []).append(("add", parts["diff"], strength))
    return terms


def _delta(terms: list[Term]) -> np.ndarray:
    """The sum of a tensor's terms, float32 (Linear: [out, in]; Conv3d: [out, C, t, h, w])."""
    total = 0
    for term in terms:
        if term[0] == "product":
            _, a, b, factor = term
            rank = a.shape[0]
            value = (b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)).reshape(
                (b.shape[0],) + a.shape[1:])
        else:
            _, value, factor = term
        total = total + value.astype(np.float32) * np.float32(factor)
    return np.asarray(total, np.float32)


def _shape_of(term: Term) -> tuple[int, ...]:
    return (term[2].shape[0],) + term[1].shape[1:] if term[0] == "product" else term[1].shape


def merge_lora_file(model: WanDiT, params: dict, path: str, strength: float = 1.0,
                    donate: bool = False) -> dict:
    """`params` (vdit DiT weights, nested; host or device arrays) with the LoRA file at `path`
    merged in at `strength`; leaves it does not touch are the same objects, a touched one keeps
    its dtype and sharding. One leaf is merged at a time (float32 on the host). With `donate`,
    each touched device array of `params` is deleted once copied to the host, so the device never
    holds a leaf twice (`params` is unusable afterwards). Errors name the tensor that has no
    place in `model` or the wrong shape; they come before anything is deleted."""
    tensors, metadata = read_lora(path)
    if _is_vdit_adapter(tensors):
        tensors, metadata = from_vdit_adapter(model, tensors, path), {}
    terms = lora_terms(tensors, metadata, strength, path)
    plan = {torch: (ours, kind, shape, tshape, layer)
            for ours, torch, kind, shape, tshape, layer in tensor_plan(model)}
    missing = sorted(n for n in terms if n not in plan)
    if missing:
        raise ValueError(f"LoRA file {path!r} adapts tensors this model does not have "
                         f"({len(missing)}, e.g. {missing[:5]}): it was made for another model "
                         f"(this one: {model.num_layers} layers, "
                         f"image branch {model.has_image_branch})")
    by_leaf: dict[str, list[str]] = {}
    for name, name_terms in terms.items():
        tshape = plan[name][3]
        for term in name_terms:
            if _squeezed(_shape_of(term)) != _squeezed(tshape):
                raise ValueError(f"LoRA file {path!r}: the delta for {name} has shape "
                                 f"{_shape_of(term)} but the model's tensor is {tshape}")
        by_leaf.setdefault(plan[name][0], []).append(name)
    flat = traverse_util.flatten_dict(params, sep="/")
    for ours, names in by_leaf.items():
        leaf = flat[ours]
        on_device = isinstance(leaf, jax.Array)
        sharding, dtype = (leaf.sharding if on_device else None), leaf.dtype
        merged = np.array(leaf, np.float32)  # this leaf only
        if donate and on_device:
            leaf.delete()
        for name in names:
            _, kind, shape, tshape, layer = plan[name]
            value = to_ours(kind, _delta(terms[name]).reshape(tshape), shape)
            if layer is None:
                merged += value
            else:
                merged[layer] += value
        merged = merged.astype(dtype)
        flat[ours] = jax.device_put(merged, sharding) if on_device else merged
    return traverse_util.unflatten_dict(flat, sep="/")


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def adapter_to_diffusers(model: WanDiT, adapter: dict, scale: float) -> dict[str, np.ndarray]:
    """A vdit adapter tree {path: {"a": [*L, *in, r], "b": [*L, r, *out]}} -> diffusers / peft
    tensors ("transformer.blocks.0.attn1.to_q.lora_A.weight" ...), `scale` (alpha / rank) folded
    into lora_B. An adapter on a kernel diffusers has no place for is an error naming it."""
    factors = traverse_util.flatten_dict(adapter, sep="/")
    kernels = sorted({k.rsplit("/", 1)[0] for k in factors})
    entries: dict[str, list] = {}
    for ours, torch, kind, _, tshape, layer in tensor_plan(model):
        entries.setdefault(ours, []).append((torch, kind, tshape, layer))
    out = {}
    for kernel in kernels:
        if kernel not in entries:
            raise ValueError(f"LoRA adapter on {kernel!r}: diffusers' WanTransformer3DModel has "
                             "no such layer, so it cannot be written in diffusers' format")
        a, b = (np.asarray(factors[f"{kernel}/{x}"], np.float32) for x in "ab")
        for torch, kind, tshape, layer in entries[kernel]:
            a_l, b_l = (a, b) if layer is None else (a[layer], b[layer])
            rank = a_l.shape[-1]
            module = DIFFUSERS_PREFIX + torch.removesuffix(".weight")
            b_t = (b_l.reshape(rank, -1) * scale).T  # [out, r]
            if kind == "patch":
                out[f"{module}.lora_A.weight"] = to_torch(
                    "patch", a_l.reshape(-1, rank), (rank,) + tuple(tshape[1:]))
                out[f"{module}.lora_B.weight"] = b_t.reshape(b_t.shape + (1, 1, 1))
            else:
                out[f"{module}.lora_A.weight"] = a_l.reshape(-1, rank).T
                out[f"{module}.lora_B.weight"] = b_t
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
