"""What `vdit plan` counts without compiling: a recipe's training config, its abstract weights
(trainable and frozen, split as the trainer splits them, LoRA included) and the bytes each device
holds of them under the logical axis rules."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vdit.config import recipe_module
from vdit.parallel.mesh import logical_to_mesh_spec
from vdit.train import optim, run_params


def training_config(config) -> ml_collections.ConfigDict:
    """The config with the sections the loss needs filled from configs/common.py."""
    common = recipe_module("common")
    cfg = ml_collections.ConfigDict(config.to_dict())
    for name in ("optim", "flow", "train"):
        if name not in cfg:
            cfg[name] = getattr(common, name)()
    if "data" not in cfg:
        cfg.data = common.packing()
        cfg.data.text_format = "embeddings"  # text encoded ahead of time, as large runs do
    return cfg


def text_in_step(cfg) -> bool:
    """Whether the step runs the text encoder (token ids in the batch) or reads embeddings."""
    return "text" in cfg and cfg.data.get("text_format", "ids") == "ids"


def weights_fn(cfg, dit):
    """rng -> (trainable, frozen) boxed parameters, built and split by the trainer's own
    `run_params.init_params` / `split_trainable`: {"dit"[, "dit_2"], "text"[, "lora"[, "lora_2"]]}.
    A step that reads text embeddings never touches the frozen text encoder, and jit drops an
    unused argument, so the plan leaves it out there."""
    text_model = run_params.build_text_model(cfg)
    unused = () if text_in_step(cfg) else ("text",)

    def split(rng):
        trainable, frozen = run_params.split_trainable(
            cfg, run_params.init_params(dit, text_model, cfg, rng))
        return trainable, {k: v for k, v in frozen.items() if k not in unused}

    return split


def abstract_weights(cfg, dit) -> tuple[dict, dict]:
    """`weights_fn`'s (trainable, frozen) as abstract shapes (`jax.eval_shape`: nothing allocated)."""
    return jax.eval_shape(weights_fn(cfg, dit), jax.random.key(0))


def _leaves(tree):
    """[(shape, dtype, logical names or None)] of a boxed abstract tree."""
    out = []
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        if isinstance(leaf, nn.Partitioned):
            out.append((leaf.value.shape, leaf.value.dtype, leaf.names))
        else:
            out.append((leaf.shape, leaf.dtype, None))
    return out


def per_device_bytes(tree, mesh: dict, rules, dtype=None) -> int:
    """Bytes one device holds of `tree` under `rules` on a mesh of `mesh` sizes."""
    total = 0
    for shape, leaf_dtype, names in _leaves(tree):
        spec = logical_to_mesh_spec(names, rules) if names else ()
        local = list(shape)
        for i, axes in enumerate(spec):
            if axes is not None:
                split = math.prod(mesh[a] for a in ((axes,) if isinstance(axes, str) else axes))
                local[i] = -(-local[i] // split)
        total += math.prod(local) * np.dtype(dtype or leaf_dtype).itemsize
    return total


def param_count(tree) -> int:
    return sum(math.prod(shape) for shape, _, _ in _leaves(tree))


def analytic_bytes(cfg, dit, mesh: dict, rules) -> tuple[dict, dict]:
    """Per-device bytes of params, EMA, optimizer and frozen weights; and parameter counts."""
    trainable, frozen = abstract_weights(cfg, dit)
    tx = optim.make_optimizer(cfg.optim, int(cfg.train.get("steps", 1)))
    opt_state = jax.eval_shape(tx.init, trainable)
    params = per_device_bytes(trainable, mesh, rules)
    out = {"parameters": params, "ema": params,
           "optimizer": per_device_bytes(opt_state, mesh, rules),
           "frozen weights": per_device_bytes(frozen, mesh, rules)}
    counts = {"trainable": param_count(trainable), "frozen": param_count(frozen)}
    return out, counts
