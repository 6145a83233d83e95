"""`vdit train`: the DiT training loop over packed latent batches, sharded, checkpointed, resumable.

One call, `train(config, workdir)`: build mesh, models and data; create or restore the state;
compile the step once ahead of time (logging its memory analysis); then step, log, checkpoint.
A run on a workdir with a checkpoint resumes exactly (model, optimizer, EMA, rng, data position).
A new run may start from another run's weights (`train.init_from`, vdit/train/init_from.py) and
may train only LoRA adapters on a frozen base (`config.lora`, vdit/models/lora.py). A Wan2.2
two-expert config (`experts`) trains one expert or both, each on its own time range
(vdit/train/experts.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh

from vdit import runs
from vdit.config import text_pad_to
from vdit.data import encode, pipeline, sources
from vdit.data.conditions import COND_TOKENS, MICRO_PREFIX
from vdit.models import lora
from vdit.models.dit import VDIT_KEYS
from vdit.parallel.mesh import logical_rules, mesh_from_config
from vdit.runs import checkpoint
from vdit.runs.run_kind import KINDS
from vdit.train import conditioning, experts, init_from, optim, preflight
from vdit.train.config_checks import check_attention_here, check_train_config
from vdit.train.flops import jaxpr_flops
from vdit.train.lock import workdir_lock
from vdit.train.metrics import MetricsWriter, drop_rows_after
from vdit.train.run_params import build_models, init_params, split_trainable
from vdit.train.state import create_state
from vdit.train.step import make_train_step
from vdit.train.step_loop import StepLoop

log = logging.getLogger(__name__)
# Sections whose values fix parameter shapes: changing them on resume cannot load the checkpoint.
SHAPE_SECTIONS = ("model", "text", "experts")
COMPUTE_KEYS = {"model": VDIT_KEYS, "text": ("dtype",)}  # change no tensor of the state


def null_caption(tokenizer) -> np.ndarray:
    """Token ids of the empty caption (what CFG's unconditional branch sees), trimmed."""
    ids, mask = tokenizer([""])
    return np.asarray(ids[0][: max(1, int(np.sum(mask[0])))], np.int32)


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """What compiling the train step needs, built from a config (by `train` and the dry run)."""

    mesh: Mesh
    rules: tuple
    tx: optax.GradientTransformation
    trainable: Callable  # rng -> boxed trainable params
    frozen: Callable     # rng -> boxed frozen params
    step_fn: Callable    # step(state, frozen, batch) -> (state, metrics)
    spec: dict           # global ShapeDtypeStructs of one packed batch
    # frozen key -> the init_from run's weights that fill it (default: the same key); e.g.
    # `vdit distill` keeps the teacher's DiT as frozen["teacher"] = the source's "dit".
    frozen_from: dict = dataclasses.field(default_factory=dict)


def shard_text_dim(config, dit) -> int | None:
    """The width of the shards' text: None for token ids, the DiT's text_dim for embeddings."""
    return None if config.data.text_format == "ids" else dit.text_dim


def step_setup(config, dit, text_model) -> StepSetup:
    mesh = mesh_from_config(config.mesh)
    rules = logical_rules("dit", config.mesh.get("rules", None))
    boxed = lambda rng: init_params(dit, text_model, config, rng)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    loss_fn = lora.wrap_loss(experts.make_loss(dit, text_model, config), config)
    text_dim = shard_text_dim(config, dit)
    return StepSetup(mesh, rules, tx, lambda r: split_trainable(config, boxed(r))[0],
                     lambda r: split_trainable(config, boxed(r))[1],
                     make_train_step(loss_fn, tx, config.train.ema_decay),
                     batch_spec(config, dit, text_dim))


def check_resume_compatible(saved: dict, config, sections=SHAPE_SECTIONS) -> None:
    """Refuses to resume when a key that fixes parameter shapes, the saved data position's
    layout (`data.num_workers`: one position per worker) or the DiT's text layout
    (`data.text_pad_to`) differs from the checkpoint's. How the
    step computes (COMPUTE_KEYS: remat, dtypes, attention backend) may change, e.g. remat after
    running out of memory."""
    want, have = ("vae" if tuple(sections) == ("vae",) else "dit"), ("dit" if "model" in saved else "vae")
    if have != want:
        raise ValueError(f"cannot resume: this workdir holds {KINDS[have]}, but this command "
                         f"trains {KINDS[want]}; use another --workdir")
    if "optim" in saved and "optim" in config:
        check_optimizer_layout(saved["optim"], config.optim.to_dict())
    workers = (saved.get("data", {}).get("num_workers"), config.get("data", {}).get("num_workers"))
    if "data" in saved and "data" in config and _normal(workers[0]) != _normal(workers[1]):
        raise ValueError(f"cannot resume: config key 'data.num_workers' = {workers[1]!r}, but the "
                         f"checkpoint saved the data position of {workers[0]!r} workers, which "
                         "another count cannot continue; resume with data.num_workers="
                         f"{workers[0]!r} or start a new --workdir with train.init_from")
    pad = [text_pad_to(c) for c in (saved, config)]
    if "data" in saved and "data" in config and pad[0] != pad[1]:
        raise ValueError(f"cannot resume: config key 'data.text_pad_to' = {pad[1]}, but the "
                         f"checkpoint's DiT trained on text laid out with {pad[0]} (0: packed "
                         f"captions, pads never attended); resume with data.text_pad_to={pad[0]} or "
                         "start a new --workdir with train.init_from")
    changed = []
    for section in sections:
        now = config[section].to_dict() if section in config else {}
        before = saved.get(section, {})
        for key in sorted(set(now) | set(before)):
            if key in COMPUTE_KEYS.get(section, ()):
                continue
            if _normal(now.get(key)) != _normal(before.get(key)):
                changed.append(f"{section}.{key}: checkpoint {before.get(key)!r} -> now {now.get(key)!r}")
    if changed:
        raise ValueError("cannot resume: the workdir's checkpoint was trained with different model "
                         "settings (" + "; ".join(changed) + "); use a new --workdir or undo the change")


def check_optimizer_layout(before: dict, now: dict) -> None:
    """Refuses a resume whose optimizer state would have another structure than the saved one:
    clipping (optim.clip_norm > 0) or accumulation (optim.grad_accum > 1) switched on or off.
    Their values may change (e.g. a lower clip norm)."""
    layout = {"clip_norm": lambda v: float(v or 0) > 0, "grad_accum": lambda v: int(v or 1) > 1}
    changed = [f"optim.{k}: checkpoint {before.get(k)!r} -> now {now.get(k)!r}"
               for k, on in layout.items() if on(before.get(k)) != on(now.get(k))]
    if changed:
        raise ValueError("cannot resume: " + "; ".join(changed) + " switches "
                         "gradient clipping or accumulation on or off, which changes the optimizer "
                         "state the checkpoint holds; resume with the saved values, or start a "
                         "new --workdir with train.init_from")


def check_process_count(workdir: str, step: int, count: int) -> None:
    """Refuses to resume on another number of processes (hosts). Each process reads its own 1/N
    slice of the shuffled source and saves its iterator position (process_I-of-N.json); with a
    different N the slices differ, so no saved position says where the new ones stand, and
    guessing would repeat or skip data silently."""
    folder = epath.Path(workdir) / "checkpoints" / str(step) / checkpoint.DATA
    saved = sorted({int(p.name.split("-of-")[1].split(".")[0])
                    for p in folder.glob(checkpoint.DATA_POSITIONS)})
    if saved and saved != [count]:
        raise ValueError(
            f"cannot resume {workdir!r} on {count} process(es): its step {step} checkpoint holds "
            f"the data position of {saved[0]} process(es), each over its own slice of the data; "
            f"with another host count those slices change and the saved positions do not apply. "
            f"Resume on {saved[0]} hosts, or start a new --workdir with train.init_from="
            f"{workdir}/checkpoints/{step} (weights kept, data order restarted)")


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
    if dit.has_image_branch:
        n = conditioning.image_tokens_per_row(config)
        spec[conditioning.IMAGE_CONTEXT] = f32(rows, n, dit.image_dim)
        spec[conditioning.IMAGE_SEGMENT_IDS] = i32(rows, n)
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


def train(config, workdir: str, stop_after: int | None = None,
          setup_fn: Callable = step_setup, samples_fn: Callable | None = None) -> list[dict]:
    """Trains to `config.train.steps` (or `stop_after` more steps); returns the logged metrics.
    Process 0 holds the workdir's lock (vdit/train/lock.py) for the whole run. `setup_fn(config,
    dit, text_model) -> StepSetup` supplies the objective: `vdit train`'s by default,
    `vdit distill`'s from vdit/distill/setup.py (same data, state, checkpoints and resume).
    `samples_fn(config, workdir, ema, frozen)` makes the periodic sampler that
    `train.sample_every` asks for (`vdit.pipelines.periodic_samples.from_config`, which `vdit
    train` passes; generation sits above training, so the trainer takes it as an argument)."""
    preflight.check_workdir(workdir)
    with workdir_lock(workdir, jax.process_index()):
        return _train(config, workdir, stop_after, setup_fn, samples_fn)


def use_compilation_cache(config) -> None:
    """Points JAX's persistent compilation cache at `train.compilation_cache_dir`, if set."""
    folder = str(config.train.get("compilation_cache_dir", "") or "")
    if folder:
        compilation_cache.set_cache_dir(str(runs.absolute(folder)))
        compilation_cache.reset_cache()  # the next compile opens the cache at the new folder


def _train(config, workdir: str, stop_after: int | None, setup_fn: Callable,
           samples_fn: Callable | None) -> list[dict]:
    use_compilation_cache(config)
    dit, text_model, tokenizer = build_models(config)
    config = check_train_config(config, dit)
    check_attention_here(dit)
    setup = setup_fn(config, dit, text_model)
    mesh, rules = setup.mesh, setup.rules
    preflight.check_batch_divides(int(config.data.rows_per_batch), mesh)
    shards = runs.latents_dir(config, workdir)
    if config.data.text_format == "ids" and runs.stats_path(shards).is_file():
        encode.check_tokenizer(encode.load_stats(shards), tokenizer, shards, "train on")
    check = pipeline.record_check(dit.patch_size, dit.out_channels or dit.in_channels,
                                  shard_text_dim(config, dit))
    mine, own_share = sources.process_shards(sources.shard_paths(shards), jax.process_index(),
                                             jax.process_count())
    source = sources.SkippingSource(sources.LatentShardSource(mine), check)
    preflight.check_has_clips(source, shards)
    preflight.check_record_keys(source.wrapped, conditioning.record_keys(config, dit))
    preflight.check_first_records(source.wrapped, check)
    data_it = iter(pipeline.packed_dataset(
        source, config.data, dit.patch_size, null_caption(tokenizer),
        condition=conditioning.uses_condition(config, dit), micro=dit.micro_conditioning,
        last_frame_rate=float(config.train.get("last_frame_rate", 0.0)),
        image=conditioning.image_record_shape(config, dit), own_share=own_share))

    rng = jax.random.key(config.train.seed)
    state, shardings = create_state(setup.trainable, setup.tx, rng, mesh, rules)
    frozen, frozen_shardings = init_from.create_frozen(config, setup.frozen, rng, mesh, rules)

    manager = checkpoint.make_manager(workdir, config.checkpoint)
    start = 0
    resuming = manager.latest_step() is not None
    saved = checkpoint.saved_config(manager) if resuming else None
    config, read = init_from.pin(config, saved)  # the base's step, fixed for the run's life
    if resuming:
        check_resume_compatible(saved, config)
        lora.check_resume(saved, config)
        init_from.check_resume(saved, config)
    # Frozen weights always, trainable ones on a fresh start (vdit/train/init_from.py).
    state, frozen = init_from.apply(config, state, shardings, frozen, frozen_shardings, resuming,
                                    setup.frozen_from, latents=shards, read=read)
    del read  # the source's host copy (pin read it to check it; apply used it): not kept all run
    if resuming:
        check_process_count(workdir, manager.latest_step(), jax.process_count())
        start, state, _ = checkpoint.restore(manager, state, data_it)
        log.info("resumed from step %d in %s", start, workdir)
    if start >= config.train.steps:  # said, not silent; a requeued finished job still succeeds
        if jax.process_index() == 0:
            print(f"vdit train: the checkpoint in {workdir} is at step {start}, already at "
                  f"train.steps={config.train.steps}: nothing to train (raise "
                  "--config.train.steps to train on; a cosine schedule is then laid over the new "
                  "total, so the learning rate rises again unless optim.decay_steps fixes it)",
                  flush=True)
        return []
    if jax.process_index() == 0:  # replayed steps replace their rows (one row per step)
        drop_rows_after(workdir, start)
    end = config.train.steps if stop_after is None else min(config.train.steps, start + stop_after)
    if end <= start:  # stop_after=0: restore (falling back past unreadable steps) and stop
        return []

    compiled, flops = compile_step(setup.step_fn, state, frozen, setup.spec, shardings,
                                   frozen_shardings, mesh, rules)
    writer = MetricsWriter(workdir, tensorboard=config.train.tensorboard, start_step=start)
    try:  # closed however the run stops (a NonFiniteError too): its last events reach the files
        samples = _periodic_samples(samples_fn, config, workdir, state.ema, frozen)
        steps = StepLoop(compiled, flops, mesh, manager, writer, config, workdir, samples)
        return steps.run(state, frozen, data_it, source, start, end)
    finally:
        writer.close()
        data_it.close()  # stops Grain's workers now, not at interpreter exit (they ignore SIGTERM)


def _periodic_samples(samples_fn, config, workdir, ema, frozen):
    if samples_fn is not None:
        return samples_fn(config, workdir, ema, frozen)
    if int(config.train.get("sample_every", 0) or 0) > 0:
        log.warning("train.sample_every is set, but this caller of vdit.train.loop.train passed no "
                    "samples_fn (vdit.pipelines.periodic_samples.from_config): no periodic samples")
    return None
