"""A run's weights as the trainer builds them: its models from the config, their boxed (logically
named) parameters {"dit", "text"[, "dit_2"][, "lora"[, "lora_2"]]}, which of them train and, for a
run without `train.init_from`, its frozen part recreated from the seed. The loop, `init_from`
(complete weights of any run), distillation and `vdit plan`'s checks use these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdit.models import lora
from vdit.models.dit import build_dit
from vdit.models.text import encoder_from_dict, text_encoder_from_config
from vdit.train import experts
from vdit.train.state import unbox


def build_models(config):
    dit = build_dit(config.model)
    text_model, tokenizer = text_encoder_from_config(config.text)
    return dit, text_model, tokenizer


def build_text_model(config):
    """The text encoder module alone: what the step runs, without reading tokenizer files."""
    if config.text.get("kind") in ("byte", "word"):
        return text_encoder_from_config(config.text)[0]
    return encoder_from_dict(config.text, config.text.get("dtype", "float32"), "config.text")


def init_params(dit, text_model, config, rng):
    """Boxed (logically named) parameters {"dit": ..., "text": ...} from dummy packed inputs;
    two-expert configs add the low-noise expert "dit_2" (same shapes, its own init), LoRA the
    adapters of the trained expert(s) ("lora", "lora_2"; vdit/train/experts.py)."""
    s, length = 8, 4
    tokens = jnp.zeros((1, s, dit.token_in_dim))
    ones = lambda n: jnp.ones((1, n), jnp.int32)
    ids = jnp.ones((1, length), jnp.int32)
    r_dit, r_text = jax.random.split(rng)
    # The DiT's draws use an "rbg" key: XLA compiles one threefry kernel per tensor, which costs
    # seconds of CPU compile per run; the frozen text encoder keeps its threefry draws.
    r_dit = jax.random.wrap_key_data(jax.random.bits(r_dit, (4,), jnp.uint32), impl="rbg")
    context = jnp.zeros((1, length, dit.text_dim))
    image = ({"image_context": jnp.zeros((1, dit.pos_embed_seq_len or 1, dit.image_dim))}
             if dit.has_image_branch else {})
    init_dit = lambda r: dit.init(r, tokens, jnp.zeros((1, s, 3), jnp.int32), ones(s),
                                  jnp.zeros((1, 1)), context, ones(length), method="packed",
                                  **image)["params"]
    params = {"dit": init_dit(r_dit), "text": text_model.init(r_text, ids, ones(length))["params"]}
    if experts.enabled(config):
        params["dit_2"] = init_dit(jax.random.fold_in(r_dit, 3))
    if lora.enabled(config):  # adapters for the targeted DiT kernels (vdit/models/lora.py)
        for i, expert in enumerate(experts.trained(config)):
            name = experts.LORA_KEY[expert]
            params[name] = lora.init_adapters(jax.random.fold_in(rng, 2 + 2 * i),
                                              params[lora.ADAPTED[name]], config.lora)
    return params


def split_trainable(config, params: dict) -> tuple[dict, dict]:
    """(trainable, frozen): the text encoder trains only when config.text.trainable; under LoRA
    only the adapters train (base DiT and text encoder frozen, whatever text.trainable says);
    of two experts, the one `experts.train` leaves out is frozen."""
    names = experts.trainable_names(config)
    return ({k: v for k, v in params.items() if k in names},
            {k: v for k, v in params.items() if k not in names})


def seed_frozen(config) -> dict:
    """The frozen weights of a run without init_from, recreated from its seed."""
    dit, text_model, _ = build_models(config)
    boxed = init_params(dit, text_model, config, jax.random.key(config.train.seed))
    return unbox(split_trainable(config, boxed)[1])
