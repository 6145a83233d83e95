"""`vdit train`: the DiT training loop over packed latent batches, sharded, checkpointed, resumable.

One call, `train(config, workdir)`: build mesh, models and data; create or restore the state;
compile the step once ahead of time (logging its memory analysis); then step, log, checkpoint.
A run on a workdir with a checkpoint resumes exactly (model, optimizer, EMA, rng, data position).
A new run may start from another run's weights (`train.init_from`, vdit/train/init_from.py) and
may train only LoRA adapters on a frozen base (`config.lora`, vdit/models/lora.py).
"""

from __future__ import annotations

import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vdit.data import encode, pipeline, sources
from vdit.data.conditions import COND_TOKENS, MICRO_PREFIX
from vdit.models import lora
from vdit.models.dit import build_dit
from vdit.models.text import text_encoder_from_config
from vdit.parallel.mesh import logical_rules, mesh_from_config
from vdit.train import checkpoint, conditioning, init_from, optim, periodic_samples
from vdit.train.flops import jaxpr_flops
from vdit.train.metrics import MetricsWriter
from vdit.train.objective import make_dit_loss
from vdit.train.state import create_state, unbox
from vdit.train.step import make_train_step

log = logging.getLogger(__name__)
# Sections whose values fix parameter shapes: changing them on resume cannot load the checkpoint.
SHAPE_SECTIONS = ("model", "text")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def latents_dir(config, workdir: str) -> str:
    return config.data.get("latents_dir", None) or os.path.join(workdir, "latents")


def null_caption(tokenizer) -> np.ndarray:
    """Token ids of the empty caption (what CFG's unconditional branch sees), trimmed."""
    ids, mask = tokenizer([""])
    return np.asarray(ids[0][: max(1, int(np.sum(mask[0])))], np.int32)


def build_models(config):
    dit = build_dit(config.model)
    text_model, tokenizer = text_encoder_from_config(config.text)
    return dit, text_model, tokenizer


def init_params(dit, text_model, config, rng):
    """Boxed (logically named) parameters {"dit": ..., "text": ...} from dummy packed inputs."""
    s, length = 8, 4
    tokens = jnp.zeros((1, s, dit.token_in_dim))
    ones = lambda n: jnp.ones((1, n), jnp.int32)
    ids = jnp.ones((1, length), jnp.int32)
    r_dit, r_text = jax.random.split(rng)
    context = jnp.zeros((1, length, dit.text_dim))
    dit_params = dit.init(r_dit, tokens, jnp.zeros((1, s, 3), jnp.int32), ones(s),
                          jnp.zeros((1, 1)), context, ones(length), method="packed")["params"]
    text_params = text_model.init(r_text, ids, ones(length))["params"]
    if lora.enabled(config):  # adapters for the targeted DiT kernels (vdit/models/lora.py)
        return {"dit": dit_params, "text": text_params,
                "lora": lora.init_adapters(jax.random.fold_in(rng, 2), dit_params, config.lora)}
    return {"dit": dit_params, "text": text_params}


def split_trainable(config, params: dict) -> tuple[dict, dict]:
    """(trainable, frozen): the text encoder trains only when config.text.trainable; under LoRA
    only the adapters train (base DiT and text encoder frozen, whatever text.trainable says)."""
    if lora.enabled(config):
        return {"lora": params["lora"]}, {"dit": params["dit"], "text": params["text"]}
    if config.text.get("trainable", False):
        return params, {}
    return {"dit": params["dit"]}, {"text": params["text"]}


def restore_frozen(config) -> dict:
    """The frozen (not trained, not checkpointed) weights of a run: from its train.init_from
    run when it has one, else recreated from its seed."""
    return init_from.frozen_weights(config)


def seed_frozen(config) -> dict:
    """The frozen weights of a run without init_from, recreated from its seed."""
    dit, text_model, _ = build_models(config)
    boxed = init_params(dit, text_model, config, jax.random.key(config.train.seed))
    return unbox(split_trainable(config, boxed)[1])


def check_resume_compatible(saved: dict, config, sections=SHAPE_SECTIONS) -> None:
    """Refuses to resume when a key that fixes parameter shapes differs from the checkpoint's."""
    changed = []
    for section in sections:
        now = config[section].to_dict() if section in config else {}
        before = saved.get(section, {})
        for key in sorted(set(now) | set(before)):
            if _normal(now.get(key)) != _normal(before.get(key)):
                changed.append(f"{section}.{key}: checkpoint {before.get(key)!r} -> now {now.get(key)!r}")
    if changed:
        raise ValueError("cannot resume: the workdir's checkpoint was trained with different model "
                         "settings (" + "; ".join(changed) + "); use a new --workdir or undo the change")


def _normal(value):
    # an absent key and an empty list are the same setting (keys added later default to empty)
    value = list(value) if isinstance(value, tuple) else value
    return None if value == [] else value


def batch_spec(config, dit, text_dim: int | None) -> dict:
    """Global shapes of one packed batch (for ahead-of-time compilation)."""
    rows, s, length = config.data.rows_per_batch, config.data.tokens_per_row, config.data.text_per_row
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    text = (i32(rows, length) if text_dim is None
            else jax.ShapeDtypeStruct((rows, length, text_dim), jnp.float32))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    spec = {"tokens": f32(rows, s, dit.token_out_dim),  # clean latents: z channels
            "positions": i32(rows, s, 3), "segment_ids": i32(rows, s), "text": text,
            "text_segment_ids": i32(rows, length), "text_positions": i32(rows, length)}
    if conditioning.uses_condition(config, dit):
        spec[COND_TOKENS] = f32(rows, s, dit.token_in_dim - dit.token_out_dim)
    for name in dit.micro_conditioning:
        spec[MICRO_PREFIX + name] = f32(rows, config.data.max_segments)
    return spec


def compile_step(step_fn, state, frozen, spec, shardings, frozen_shardings, mesh, rules):
    """jit with explicit shardings and a donated state, lowered and compiled before step 0.
    Returns (compiled, FLOPs of one step over all devices, counted on its jaxpr: see flops.py)."""
    batch_sharding = pipeline.batch_sharding(mesh)
    jitted = jax.jit(step_fn, in_shardings=(shardings, frozen_shardings, batch_sharding),
                     out_shardings=(shardings, None), donate_argnums=(0,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        traced = jitted.trace(state, frozen, spec)
        compiled = traced.lower().compile()
    memory = compiled.memory_analysis()
    if memory is not None:
        log.info("train step memory per device: arguments %.1f MB, outputs %.1f MB, temp %.1f MB",
                 memory.argument_size_in_bytes / 1e6, memory.output_size_in_bytes / 1e6,
                 memory.temp_size_in_bytes / 1e6)
    # Not compiled.cost_analysis(): it counts the scanned blocks once, and per device.
    return compiled, jaxpr_flops(traced.jaxpr)


def train(config, workdir: str, stop_after: int | None = None) -> list[dict]:
    """Trains to `config.train.steps` (or `stop_after` more steps); returns the logged metrics."""
    config = init_from.checked(config)
    lora.check_config(config)
    mesh = mesh_from_config(config.mesh)
    rules = logical_rules("dit", config.mesh.get("rules", None))
    dit, text_model, tokenizer = build_models(config)
    conditioning.check_config(config, dit)
    shards = latents_dir(config, workdir)
    if config.data.text_format == "ids" and os.path.isfile(os.path.join(shards, encode.STATS_FILE)):
        encode.check_tokenizer(encode.load_stats(shards), tokenizer, shards, "train on")
    source = sources.SkippingSource(sources.LatentShardSource(shards))
    data_it = iter(pipeline.packed_dataset(
        source, config.data, dit.patch_size, null_caption(tokenizer),
        condition=conditioning.uses_condition(config, dit), micro=dit.micro_conditioning,
        last_frame_rate=float(config.train.get("last_frame_rate", 0.0))))

    boxed = lambda rng: init_params(dit, text_model, config, rng)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    rng = jax.random.key(config.train.seed)
    state, shardings = create_state(lambda r: split_trainable(config, boxed(r))[0], tx, rng,
                                    mesh, rules)
    frozen, frozen_shardings = init_from.create_frozen(
        config, lambda r: split_trainable(config, boxed(r))[1], rng, mesh, rules)

    manager = checkpoint.make_manager(workdir, config.checkpoint)
    start = 0
    resuming = manager.latest_step() is not None
    if resuming:
        saved = checkpoint.saved_config(manager)
        check_resume_compatible(saved, config)
        lora.check_resume(saved, config)
    # Frozen weights always, trainable ones on a fresh start (vdit/train/init_from.py).
    state, frozen = init_from.apply(config, state, shardings, frozen, frozen_shardings, resuming)
    if resuming:
        start, state, _ = checkpoint.restore(manager, state, data_it)
        log.info("resumed from step %d in %s", start, workdir)

    loss_fn = lora.wrap_loss(make_dit_loss(dit, text_model, config), config)
    step_fn = make_train_step(loss_fn, tx, config.train.ema_decay)
    text_dim = None if config.data.text_format == "ids" else dit.text_dim
    compiled, flops = compile_step(step_fn, state, frozen, batch_spec(config, dit, text_dim),
                                   shardings, frozen_shardings, mesh, rules)
    end = config.train.steps if stop_after is None else min(config.train.steps, start + stop_after)
    writer = MetricsWriter(workdir, tensorboard=config.train.tensorboard)
    history = _run(compiled, flops, state, frozen, data_it, source, mesh, manager, writer,
                   config, start, end, workdir)
    writer.close()
    return history


def _run(compiled, flops, state, frozen, data_it, source, mesh, manager, writer, config,
         start, end, workdir) -> list[dict]:
    history = []
    samples = periodic_samples.from_config(config, workdir, state.ema, frozen)
    peak = float(config.train.peak_flops_per_device) * jax.device_count()
    bar = tqdm(range(start, end), initial=start, total=config.train.steps, desc="train",
               disable=jax.process_index() != 0 or not config.train.progress)
    for step in bar:
        t0 = time.perf_counter()
        batch = pipeline.to_global(next(data_it), mesh)
        state, out = compiled(state, frozen, batch)
        out = jax.device_get(out)
        seconds = time.perf_counter() - t0
        metrics = {"loss": out["loss"], "grad_norm": out["grad_norm"], "step_time": seconds,
                   "tokens_per_s": out["tokens"] / seconds, "data/skipped": source.skipped,
                   "nonfinite_total": int(state.bad_total)}
        if peak > 0:
            metrics["mfu"] = flops / seconds / peak
        history.append({"step": step + 1, **metrics})
        if (step + 1) % config.train.log_every == 0 or step + 1 == end:
            writer.write(step + 1, metrics)
        bar.set_postfix(loss=f"{float(out['loss']):.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if int(state.bad_streak) >= config.train.max_bad_steps:
            manager.wait_until_finished()
            raise NonFiniteError(
                f"step {step + 1}: {int(state.bad_streak)} consecutive steps with a non-finite loss "
                f"or gradient (limit train.max_bad_steps={config.train.max_bad_steps}); updates "
                "were skipped, the last checkpoint is intact")
        if (step + 1) % config.checkpoint.every == 0 or step + 1 == config.train.steps:
            checkpoint.save(manager, step + 1, state, config, data_it)
        if samples is not None:
            samples.maybe_write(step + 1, state.ema, frozen, writer)
    manager.wait_until_finished()
    return history
