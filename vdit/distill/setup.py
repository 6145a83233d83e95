"""`vdit distill`: a few-step student from a trained teacher run, on the same trainer as `vdit train`.

    vdit distill --config configs/shapes_distill.py --workdir runs/distill \
        --config.distill.teacher=runs/dit
    vdit sample  --workdir runs/distill --prompt "a red circle moving right" --out fast.mp4

`distill(config, workdir)` is `vdit.train.loop.train` with another objective (`distill_setup`,
the loss of vdit/distill/objective.py); data pipeline, packing, sharding, checkpoints, metrics
and exact resume are the trainer's. The config is made from the teacher's (`prepare`):
  - `distill.teacher` (a run folder or a checkpoint step folder) becomes `train.init_from` with
    `train.init_from_weights = distill.teacher_weights` (its EMA by default: what it samples with),
    so the student starts as the teacher and the frozen text encoder is the teacher's;
  - the teacher's model, text, vae and encode sections replace the recipe's (the student is the
    teacher's architecture, decodes with its VAE); data.latents_dir defaults to its latents;
  - training is text-to-video (train.i2v_rate = 0): the distillation target is the guided
    text-to-video ODE.
The full-weight student keeps the teacher's DiT as a frozen copy (frozen["teacher"]); a LoRA
student (`lora.enabled`) trains adapters on the frozen teacher, and its checkpoints hold only the
adapters (a few-step adapter for the teacher, like the popular 4-step LoRAs; `vdit export` merges
it). The student's run config carries its sampler (`sample.scheduler` = ConsistencySampler,
`sample.steps`, `sample.guidance` = 1: no unconditional pass), so `vdit sample --workdir` uses it.
"""

from __future__ import annotations

import copy

import ml_collections
import numpy as np

from vdit import runs
from vdit.config import ConfigError
from vdit.diffusion.samplers_consistency import CLASS_NAME as CONSISTENCY
from vdit.distill.objective import make_distill_loss
from vdit.models import lora
from vdit.models.text import text_encoder_from_config
from vdit.parallel.mesh import logical_rules, mesh_from_config
from vdit.pipelines import periodic_samples
from vdit.runs.checkpoint import read_config
from vdit.train import init_from, loop, optim, run_params
from vdit.train.step import make_train_step

TEACHER_SECTIONS = ("model", "text", "vae", "encode")
KEYS = ("teacher", "teacher_weights", "method", "guidance", "tangent_warmup", "delta",
        "weight_eps", "teacher_substeps", "window_start")
WINDOW_STARTS = ("data", "student")
METHODS = ("continuous", "discrete", "window")


def check_config(config) -> None:
    """Start-up checks of the `distill` section; errors name the key."""
    if "distill" not in config:
        raise ConfigError("the config has no 'distill' section, which `vdit distill` needs: use "
                          "configs/shapes_distill.py or a recipe derived from it")
    cfg = config.distill
    unknown = sorted(set(cfg.keys()) - set(KEYS))
    if unknown:
        raise ConfigError(f"config keys {['distill.' + k for k in unknown]} are unknown; allowed: "
                          f"{['distill.' + k for k in KEYS]}")
    if not cfg.get("teacher", ""):
        raise ConfigError("config key 'distill.teacher' is empty: give the teacher run, e.g. "
                          "--config.distill.teacher=runs/dit")
    init_from.which_weights(ml_collections.ConfigDict(
        {"train": {"init_from_weights": cfg.get("teacher_weights", "ema")}}))
    if cfg.get("method", "continuous") not in METHODS:
        raise ConfigError(f"config key 'distill.method' = {cfg.method!r}; allowed: {list(METHODS)}")
    for key, low in (("guidance", 0.0), ("weight_eps", 0.0), ("delta", 0.0)):
        value = cfg.get(key, 0.05 if key == "delta" else None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low:
            raise ConfigError(f"config key 'distill.{key}' = {value!r}: expected a number > {low}")
    warmup = cfg.get("tangent_warmup", None)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"config key 'distill.tangent_warmup' = {warmup!r}: expected a whole "
                          "number of steps >= 0")
    substeps = cfg.get("teacher_substeps", 1)
    if isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
        raise ConfigError(f"config key 'distill.teacher_substeps' = {substeps!r}: expected a whole "
                          "number >= 1")
    if cfg.get("window_start", "data") not in WINDOW_STARTS:
        raise ConfigError(f"config key 'distill.window_start' = {cfg.window_start!r}; allowed: "
                          f"{list(WINDOW_STARTS)}")
    if cfg.get("method", "continuous") == "window":
        check_window_sampler(config.sample)
    if float(config.train.get("i2v_rate", 0.0)) > 0:
        raise ConfigError(f"config key 'train.i2v_rate' = {config.train.i2v_rate}: `vdit distill` "
                          "distills text-to-video; set it to 0")
    if config.data.get("text_format", "ids") != "ids":
        raise ConfigError(f"config key 'data.text_format' = {config.data.text_format!r}: `vdit "
                          "distill` encodes the empty caption for the teacher's unconditional "
                          "branch and needs token-id shards ('ids')")


def check_window_sampler(sample) -> None:
    """The "window" method trains F for the deterministic ConsistencySampler's grid: a student
    that re-noised between steps (gamma > 0) would read its window velocity as a jump to t = 0."""
    scheduler = dict(sample.get("scheduler", None) or {})
    if scheduler.get("_class_name") != CONSISTENCY or scheduler.get("gamma", 1.0) != 0:
        raise ConfigError(
            f"config key 'distill.method' = 'window' trains the student for the deterministic "
            f"few-step sampler, but config key 'sample.scheduler' = {scheduler!r}; set "
            f"_class_name={CONSISTENCY!r} and gamma=0")


def prepare(config) -> ml_collections.ConfigDict:
    """The run config of a student of `config.distill.teacher` (see the module doc)."""
    check_config(config)
    teacher = str(runs.absolute(config.distill.teacher))
    workdir, step = init_from.resolve(teacher)
    try:
        saved = read_config(workdir, step)  # its weights are read once, when the run pins them
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config key 'distill.teacher' = {config.distill.teacher!r} (a "
                                f"vdit run or <run>/checkpoints/<step>): {e}") from e
    if "model" not in saved:
        raise ConfigError(f"config key 'distill.teacher' = {teacher!r} is not a DiT run (its "
                          "config has no 'model' section)")
    if saved.get("experts"):  # the student would learn the high-noise expert at every time
        raise ConfigError(f"config key 'distill.teacher' = {teacher!r} is a two-expert (Wan2.2 "
                          "A14B style) run; distillation takes a one-DiT teacher")
    config = copy.deepcopy(config)
    saved = ml_collections.ConfigDict(saved)
    with config.unlocked():
        for section in TEACHER_SECTIONS:
            if section in saved:
                config[section] = saved[section]
        config.distill.teacher = teacher
        config.train.init_from = teacher
        config.train.init_from_weights = config.distill.get("teacher_weights", "ema")
        config.train.i2v_rate = 0.0
        config.train.last_frame_rate = 0.0
        if not config.data.get("latents_dir", ""):
            config.data.latents_dir = str(runs.absolute(runs.latents_dir(saved, workdir)))
    return config


def abstract_config(config) -> ml_collections.ConfigDict:
    """The student config `vdit distill --dry-run` compiles: the recipe's own model, text and vae
    sections stand for the teacher's (a distill recipe derives from its teacher's recipe), and no
    teacher run is read."""
    check_config(config)
    config = copy.deepcopy(config)
    with config.unlocked():
        config.train.i2v_rate = 0.0
        config.train.last_frame_rate = 0.0
    return config


def distill_setup(config, dit, text_model, null_ids=None) -> loop.StepSetup:
    """`vdit.train.loop.step_setup` with the distillation loss and the teacher in `frozen`.

    null_ids: the empty caption's token ids (default: the config's tokenizer says)."""
    mesh = mesh_from_config(config.mesh)
    rules = logical_rules("dit", config.mesh.get("rules", None))
    boxed = lambda rng: run_params.init_params(dit, text_model, config, rng)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    if null_ids is None:
        null_ids = loop.null_caption(text_encoder_from_config(config.text)[1])
    loss_fn = make_distill_loss(dit, text_model, config, null_ids)
    text_dim = loop.shard_text_dim(config, dit)
    teacher_copy = not lora.enabled(config)  # under LoRA the frozen base DiT is the teacher

    def frozen(rng):
        params = boxed(rng)
        part = run_params.split_trainable(config, params)[1]
        return {**part, "teacher": params["dit"]} if teacher_copy else part

    return loop.StepSetup(mesh, rules, tx, lambda r: run_params.split_trainable(config, boxed(r))[0],
                          frozen, make_train_step(loss_fn, tx, config.train.ema_decay, True),
                          loop.batch_spec(config, dit, text_dim),
                          {"teacher": "dit"} if teacher_copy else {})


def abstract_setup(config, dit, text_model) -> loop.StepSetup:
    """`distill_setup` without tokenizer files, for the dry run: the empty caption is one
    end-of-text token (as UMT5 encodes it); the compiled program depends on its length only."""
    return distill_setup(config, dit, text_model, np.ones((1,), np.int32))


def distill(config, workdir: str, stop_after: int | None = None) -> list[dict]:
    """Distils to `config.train.steps` (or `stop_after` more steps); returns the logged metrics."""
    return loop.train(prepare(config), workdir, stop_after, setup_fn=distill_setup,
                      samples_fn=periodic_samples.from_config)

