"""`train.init_from`: start a run from another run's weights; the complete weights of any run.

A run's complete weights are {"dit", "text"} (and "dit_2", a Wan2.2 run's low-noise expert): the
trainable part comes from its checkpoint, the frozen part (never checkpointed) from its own
`train.init_from` run (recursively) or, without one, recreated from its seed; LoRA adapters, when
the checkpoint holds them, are merged into their DiT.
`run_weights` returns exactly what the run trained against, so sampling, exporting and chaining
stages all see the same model.

`train.init_from` is a vdit workdir (its latest checkpoint) or one checkpoint step folder
(`<workdir>/checkpoints/<step>`); `train.init_from_weights` ("params" or "ema") says which of its
weights to take. A new run takes from it:
  - always: its frozen weights (the text encoder when `text.trainable` is False; under LoRA also
    the base DiT), so a resumed run keeps training against the same frozen model;
  - on a fresh start only (a workdir without a checkpoint; resuming wins): its trainable weights,
    as both params and EMA. The optimizer, step counter and data iterator start fresh.
Shapes must match the new run's model exactly; a mismatch names every differing tensor.
Relative paths (also `encode.vae_workdir` and `data.latents_dir`) are taken from the current
directory and stored absolute in the run's config. A workdir is pinned when the run starts
(`pin`) at its newest readable step (an unreadable newer one is named and skipped, as a resume
would): the saved config names its step folder, so a base run that trains on does not change the
weights a LoRA run (or a frozen text encoder) trained against; a resume with the same workdir
keeps the pinned step.
"""

from __future__ import annotations

import copy
import logging

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from vdit import config as config_lib
from vdit import runs
from vdit.data import encode
from vdit.models import lora
from vdit.runs import checkpoint
from vdit.runs.checkpoint import load_params, load_step_params
from vdit.runs.run_kind import check_kind
from vdit.train import experts, run_params
from vdit.train.state import create_sharded, shardings_of, unbox

log = logging.getLogger(__name__)
WHICH = ("params", "ema")
PARTS = ("dit", "text")
MAX_CHAIN = 32  # init_from links followed before suspecting a cycle


def source_path(config) -> str:
    return str(config.train.get("init_from", "") or "")


def which_weights(config) -> str:
    which = config.train.get("init_from_weights", "params")
    if which not in WHICH:
        raise ValueError(f"config key 'train.init_from_weights' = {which!r}; allowed: {list(WHICH)}")
    return which


def checked(config):
    """Validates the init_from keys; returns a copy of `config` whose train.init_from,
    encode.vae_workdir and data.latents_dir are absolute (the run's saved config must find those
    folders from any directory), or `config` itself."""
    path = source_path(config)
    if path:
        which_weights(config)
    keys = [("train", "init_from"), ("encode", "vae_workdir"), ("data", "latents_dir")]
    paths = {k: str(config.get(k[0], {}).get(k[1], "") or "") for k in keys}
    if all(not p or str(runs.absolute(p)) == p for p in paths.values()):
        return config
    config = copy.deepcopy(config)
    for (section, key), value in paths.items():
        if value:
            config[section][key] = str(runs.absolute(value))
    return config


def pin(config, saved: dict | None) -> tuple[ml_collections.ConfigDict, tuple | None]:
    """(`config` with a workdir init_from replaced by its step folder, `read`): the step the
    checkpoint's config (`saved`, when resuming) pinned for the same workdir, else the workdir's
    newest readable step. `read`: that step's (weights, config) when this process read them to
    know they read (hand it to `apply`, so a 14B source is not read twice), else None."""
    path = source_path(config)
    if not path or resolve(path)[1] is not None:
        return config, None
    workdir = str(runs.absolute(path))
    before = str((saved or {}).get("train", {}).get("init_from", "") or "")
    if before and before.rstrip("/") == workdir.rstrip("/"):
        return config, None  # a run saved before pinning: keep reading the workdir as it did
    folder = runs.absolute(before) if before else None
    read = None
    if folder is not None and folder.parent.name == "checkpoints" and \
            str(folder.parent.parent).rstrip("/") == workdir.rstrip("/"):
        step = int(folder.name)
    elif saved is not None:
        return config, None  # resuming against another source: check_resume says what changed
    else:
        step, read = newest_readable(workdir, which_weights(config))
    config = copy.deepcopy(config)
    config.train.init_from = str(runs.user_path(workdir) / "checkpoints" / str(step))
    log.info("train.init_from: %s pinned at its step %d", workdir, step)
    return config, read


def newest_readable(workdir: str, which: str) -> tuple[int, tuple | None]:
    """(step, read) of the init_from run's newest step whose `which` weights and config read, as
    resuming and sampling fall back (newer unreadable steps are named and left in place: the run
    is another's). Process 0 decides, reading them (`read`: (weights, config); None elsewhere),
    and tells the others: a source still training could finish a step between two hosts' reads,
    and every host must start from the same weights."""
    if not runs.checkpoints_dir(workdir).is_dir():
        raise FileNotFoundError(f"config key 'train.init_from' = {workdir!r}: no checkpoints/ "
                                "folder there: train it first")
    step, read = 0, None
    if jax.process_index() == 0:
        step, weights, saved = load_step_params(workdir, which)
        read = (weights, saved)
    if jax.process_count() > 1:
        step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
    newest = checkpoint.latest_step(workdir)
    if step != newest:
        log.warning("train.init_from: %s: its newest step %d does not read (said above); "
                    "pinned at step %d, its newest readable one", workdir, newest, step)
    return step, read


def check_resume(saved: dict, config) -> None:
    """A resumed run keeps the frozen weights it trained against: when it has frozen parts, its
    (pinned) train.init_from and init_from_weights must be the checkpoint's."""
    keys = frozen_keys(config)
    if not keys:
        return
    # `vdit distill` (distill.prepare) overwrites train.init_from* from distill.teacher*, so a
    # hint naming the train keys could not work there: name the keys the user sets.
    distill = bool(config.get("distill", {}).get("teacher", ""))
    flags = {"init_from": "distill.teacher" if distill else "train.init_from",
             "init_from_weights": "distill.teacher_weights" if distill else "train.init_from_weights"}
    changed, hint = [], []
    for key, default in (("init_from", ""), ("init_from_weights", "params")):
        before = saved.get("train", {}).get(key, default) or default
        now = config.train.get(key, default) or default
        same = (before == now if key == "init_from_weights" or not (before and now) else
                same_place(before, now))
        if not same:
            changed.append(f"{flags[key]}: checkpoint {before!r} -> now {now!r}")
            hint.append(f"--config.{flags[key]}={before}")
    if changed:
        raise ValueError(f"cannot resume this run against other frozen weights {keys} ("
                         + "; ".join(changed) + "): they would change under the trained ones; "
                         f"resume with {' '.join(hint)}, or start a new --workdir")


def same_place(a: str, b: str) -> bool:
    """Whether two user paths (relative ones from the current directory) name one folder."""
    return str(runs.absolute(a)).rstrip("/") == str(runs.absolute(b)).rstrip("/")


def resolve(path: str) -> tuple[str, int | None]:
    """(workdir, step) of a checkpoint step folder `<workdir>/checkpoints/<step>`, else
    (path, None): a workdir, read at its latest step."""
    path = runs.absolute(path)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        if not path.is_dir():
            raise FileNotFoundError(
                f"checkpoint step folder {str(path)!r} does not exist (a run pins the step of "
                "its train.init_from run when it starts; if that run's checkpoint.keep removed it "
                "since, restore the step, or keep steps with checkpoint.keep_every)")
        return str(path.parent.parent), int(path.name)
    return str(path), None


def run_weights(path: str, which: str = "ema", _depth: int = 0,
                read: tuple | None = None) -> tuple[dict, dict]:
    """(complete weights {"dit", "text"} as host arrays, saved config dict) of the run at `path`
    (workdir or step folder); `which` = "ema" or "params" for its trainable part. `read`: the
    checkpoint's (weights, config dict) when already read, else they are read here."""
    workdir, step = resolve(path)
    params, saved = read if read is not None else load_params(workdir, which, step)
    check_kind(params, saved, "dit", path, "run")
    config = ml_collections.ConfigDict(saved)
    weights = dict(params)
    if not set(PARTS + (("dit_2",) if "experts" in config else ())) <= set(weights):
        weights = {**frozen_weights(config, _depth + 1), **weights}
    weights = lora.merge_all(weights, config.get("lora", {}))
    return jax.tree.map(np.asarray, weights), saved


def frozen_weights(config, _depth: int = 0) -> dict:
    """The frozen (not checkpointed) weights of a run with `config`: from its init_from run, or
    recreated from its seed."""
    path = source_path(config)
    if not path:
        return run_params.seed_frozen(config)
    if _depth > MAX_CHAIN:
        raise ValueError(f"train.init_from chain longer than {MAX_CHAIN} runs (a cycle?) at {path!r}")
    weights = source_weights(config, _depth)
    keys = frozen_keys(config)
    return {k: weights[k] for k in keys}


def source_weights(config, _depth: int = 0) -> dict:
    """The complete weights of the run that `config`'s train.init_from names."""
    return source_run(config, _depth)[0]


def source_run(config, _depth: int = 0, read: tuple | None = None) -> tuple[dict, dict]:
    """(complete weights, saved config dict) of the run that `config`'s train.init_from names;
    `read`: its checkpoint's (weights, config) already read (see `pin`)."""
    path = source_path(config)
    try:
        return run_weights(path, which_weights(config), _depth, read)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config key 'train.init_from' = {path!r} (a vdit workdir or "
                                f"<workdir>/checkpoints/<step>): {e}") from e


def frozen_keys(config) -> list[str]:
    return sorted(run_params.split_trainable(config, dict.fromkeys(experts.part_names(config), 0))[1])


def check_shapes(source: dict, target, where: str) -> None:
    """Every tensor of `target` (arrays or ShapeDtypeStructs) must exist in `source` with the
    same shape; the error lists all differences."""
    have = traverse_util.flatten_dict(source, sep="/")
    want = traverse_util.flatten_dict(target, sep="/")
    problems = [f"{k}: {where} has {tuple(np.shape(have[k]))}, this run needs {tuple(v.shape)}"
                for k, v in sorted(want.items()) if k in have and tuple(np.shape(have[k])) != tuple(v.shape)]
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        problems.append(f"missing in {where}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"not in this run's model: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if problems:
        raise ValueError(f"config key 'train.init_from': the weights of {where} do not fit this "
                         "run's model (model/text settings differ?): " + "; ".join(problems))


def create_frozen(config, boxed_fn, rng, mesh, rules):
    """(frozen, shardings) of a new run's frozen weights `boxed_fn(rng)`: created from the seed,
    or, when init_from is set, only their abstract shapes (no random init; `apply` fills them)."""
    if not source_path(config):
        return create_sharded(boxed_fn, rng, mesh, rules)
    return unbox(jax.eval_shape(boxed_fn, rng)), shardings_of(boxed_fn, mesh, rules)


def apply(config, state, shardings, frozen: dict, frozen_shardings, resuming: bool,
          frozen_from: dict | None = None, latents=None, read: tuple | None = None):
    """(state, frozen) with the frozen weights from `train.init_from` (`frozen` may be abstract,
    see `create_frozen`), and on a fresh start the trainable ones too (params and EMA; the
    optimizer state, step and rng stay as created). `frozen_from` maps a frozen key to the
    source's key that fills it (default: the same key). `latents`: this run's latents folder, for
    `check_latent_space` on a fresh start. `read`: what `pin` read of the source, else None."""
    path = source_path(config)
    if not path or (resuming and not frozen):  # nothing to take from the source
        return state, frozen
    weights, source_config = source_run(config, read=read)
    if not resuming and latents is not None:
        check_latent_space(config, source_config, latents)
        check_text_layout(config, source_config)
    where = f"init_from run {path!r}"
    alias = frozen_from or {}
    needed = {alias.get(k, k) for k in frozen} | (set() if resuming else set(state.params))
    missing = sorted(k for k in needed - set(weights)
                     if not k.startswith("lora"))  # adapters (lora, lora_2) start fresh
    if missing:
        raise ValueError(f"config key 'train.init_from': {where} has no {missing} (it holds "
                         f"{sorted(weights)}); this run's model needs them (e.g. 'dit_2', the "
                         "low-noise expert of a two-expert run: start from a two-expert run)")
    if frozen:
        frozen = jax.device_put(_fit({k: weights[alias.get(k, k)] for k in frozen}, frozen, where),
                                frozen_shardings)
    take = {k: weights[k] for k in state.params if k in weights}
    if resuming or not take:
        return state, frozen
    take = _fit(take, {k: state.params[k] for k in take}, where)
    # Two transfers, two buffers: params and EMA are donated to the step separately.
    params = {**state.params, **jax.device_put(take, {k: shardings.params[k] for k in take})}
    ema = {**state.ema, **jax.device_put(take, {k: shardings.ema[k] for k in take})}
    log.info("initialised %s from %s (%s weights)", sorted(take), path, which_weights(config))
    return state.replace(params=params, ema=ema), frozen


def check_latent_space(config, source: dict, latents) -> None:
    """Warns when a run starts from weights trained on other latents than its own: encoded by
    another VAE (`encode.vae_workdir`), or normalised with other statistics (the stats.json of
    each run's latents folder). Shapes match, so nothing else would tell; a deliberate switch
    (e.g. to a finetuned VAE) stays possible."""
    said = []
    before = str(source.get("encode", {}).get("vae_workdir", "") or "")
    now = str(config.get("encode", {}).get("vae_workdir", "") or "")
    if before and now and not same_place(before, now):
        said.append(f"its latents came from the VAE {before!r}, this run's from {now!r} (config "
                    "key 'encode.vae_workdir')")
    theirs = runs.latents_dir(ml_collections.ConfigDict(source), resolve(source_path(config))[0])
    if runs.stats_path(theirs).is_file() and runs.stats_path(latents).is_file():
        a, b = encode.load_stats(theirs), encode.load_stats(latents)
        for key in ("mean", "std"):
            x, y = np.asarray(a.get(key, []), float), np.asarray(b.get(key, []), float)
            if x.shape != y.shape or not np.allclose(x, y, rtol=1e-3, atol=1e-5):
                said.append(f"latent {key} {np.round(x, 4).tolist()} in {theirs} against "
                            f"{np.round(y, 4).tolist()} in {latents} (encode with "
                            f"--config.encode.stats_from={theirs} to keep them)")
    if said:
        log.warning("train.init_from %s was trained on other latents than this run's: %s; the "
                    "weights it hands on expect its inputs", source_path(config), "; ".join(said))


def check_text_layout(config, source: dict) -> None:
    """Warns when a run trains its DiT on another text layout than its source sampled with:
    Wan's weights attend to every zero-padded text position (`data.text_pad_to`), vdit's own
    models to packed captions only; the first steps would relearn the difference."""
    theirs = config_lib.text_masked(ml_collections.ConfigDict(source))
    ours = config_lib.text_masked(config)
    if theirs != ours:
        said = {True: "packed captions only", False: "every zero-padded text position"}
        log.warning("train.init_from %s attends to %s, this run's DiT trains on %s (config key "
                    "'data.text_pad_to' = %s; set it as the source trained: text.max_length for "
                    "Wan's weights, 0 for a vdit model trained on packed captions)",
                    source_path(config), said[theirs], said[ours], config_lib.text_pad_to(config))


def _fit(source: dict, target, where: str) -> dict:
    """`source` checked against `target`'s shapes and cast to its dtypes."""
    check_shapes(source, target, where)
    return jax.tree.map(lambda s, t: np.asarray(s, t.dtype), source, target)
