"""What `vdit plan` counts without compiling: a recipe's training config, its abstract weights
(trainable and frozen, split as the trainer splits them, LoRA included) and the bytes each device
holds of them under the logical axis rules."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdit.config import recipe_module
from vdit.models import lora, text
from vdit.parallel.mesh import logical_to_mesh_spec
from vdit.train import experts, optim


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


def abstract_weights(cfg, dit) -> tuple[dict, dict]:
    """(trainable, frozen) boxed abstract parameters: {"dit"[, "dit_2"][, "text"][, "lora"[, "lora_2"]]}
    split like the trainer."""
    s, length = 8, 4
    ones = lambda n: jnp.ones((1, n), jnp.int32)

    image = ({"image_context": jnp.zeros((1, dit.pos_embed_seq_len or 1, dit.image_dim))}
             if dit.has_image_branch else {})  # Wan2.1 I2V: the image branch's parameters

    def init(rng):
        out = {"dit": dit.init(rng, jnp.zeros((1, s, dit.token_in_dim)),
                               jnp.zeros((1, s, 3), jnp.int32), ones(s), jnp.zeros((1, 1)),
                               jnp.zeros((1, length, dit.text_dim)), ones(length),
                               method="packed", **image)["params"]}
        if text_in_step(cfg):
            text_model = step_text_model(cfg)
            out["text"] = text_model.init(rng, ones(length), ones(length))["params"]
        if lora.enabled(cfg):
            out["lora"] = lora.init_adapters(rng, out["dit"], cfg.lora)
        return out

    boxed = jax.eval_shape(init, jax.random.key(0))
    if experts.enabled(cfg):  # Wan2.2 two experts of one shape (vdit/train/experts.py)
        boxed["dit_2"] = boxed["dit"]
        if "lora" in boxed:
            boxed["lora_2"] = boxed["lora"]
    names = set(experts.trainable_names(cfg))  # what the trainer trains; the rest is frozen
    return ({k: v for k, v in boxed.items() if k in names},
            {k: v for k, v in boxed.items() if k in set(experts.part_names(cfg)) - names})


def step_text_model(cfg):
    if cfg.text.get("kind") in ("byte", "word"):
        return text.text_encoder_from_config(cfg.text)[0]
    return text.encoder_from_dict(cfg.text, cfg.text.get("dtype", "float32"), "config.text")


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
