"""Orbax checkpoints of a run: train state, data-iterator state and the config, in one step folder.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it when complete),
so a crash or SIGKILL during a save leaves the previous checkpoint intact and loadable. Retention:
the latest `keep` plus every `keep_every`-th step. Config section `checkpoint`: every (steps between
saves), keep, keep_every (0 = off), async_save, replica_slice_min_bytes (below).
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from vdit import runs
from vdit.runs.checkpoint_fallback import DataPositionError, newest_readable, one_line

STATE, DATA, CONFIG = "state", "data", "config"
DATA_POSITIONS = "process_*-of-*.json"  # Grain's iterator position files, one per process


def make_manager(workdir: str, cfg, with_data: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager under `workdir/checkpoints` with the configured retention."""
    policies = [pp.LatestN(n=int(cfg.keep))]
    if int(cfg.keep_every) > 0:
        policies.append(pp.EveryNSteps(interval_steps=int(cfg.keep_every)))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=bool(cfg.async_save),
        create=True,
    )
    names = (STATE, DATA, CONFIG) if with_data else (STATE, CONFIG)
    handlers = {STATE: _state_handler(cfg), CONFIG: ocp.JsonCheckpointHandler()}
    if with_data:
        handlers[DATA] = grain.checkpoint.CheckpointHandler()
    return ocp.CheckpointManager(runs.checkpoints_dir(workdir),
                                 item_names=names, item_handlers=handlers, options=options)


def _state_handler(cfg) -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler with its standard types, where an array replicated over R devices is
    split into R slices written in parallel only when each slice holds at least
    `cfg.replica_slice_min_bytes` (0: always, Orbax's default). Slicing a small replicated array
    (a norm scale, a bias) costs a dispatch per slice and gains nothing; on 8 CPU devices it made
    a tiny run's first save 4 s. No typed PRNG keys are saved (the state keeps `key_data`), so
    Orbax's array-metadata store, which exists to re-wrap them, is not needed."""
    min_bytes = int(cfg.get("replica_slice_min_bytes", 0)) or None  # runs saved before the key
    arrays = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=min_bytes,
                                            array_metadata_store=None)
    scalars = ocp.type_handlers.ScalarHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, scalars), (float, scalars), (bytes, scalars), (np.number, scalars),
        (np.ndarray, ocp.type_handlers.NumpyHandler()), (jax.Array, arrays),
        (str, ocp.type_handlers.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict, data_iterator=None, force: bool = False) -> bool:
    """Starts an (async) save of state + config (+ iterator position); returns whether it saved."""
    items = {STATE: ocp.args.PyTreeSave(state), CONFIG: ocp.args.JsonSave(config.to_dict())}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def write_weights(workdir: str, step: int, params: Any, ema: Any,
                  config: ml_collections.ConfigDict) -> None:
    """A run folder holding one synchronous checkpoint of weights only (params + EMA + step, no
    optimizer or iterator state): what `vdit export` and `vdit convert` write."""
    config.checkpoint.async_save = False
    manager = make_manager(workdir, config.checkpoint, with_data=False)
    save(manager, step, {"step": step, "params": params, "ema": ema}, config, force=True)
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator=None,
            step: int | None = None) -> tuple[int, Any, dict]:
    """Restores the newest readable (or given) step into the shapes/shardings of `abstract_state`.

    The iterator, when given, is restored in place, after the state. Steps whose state, config or
    data position do not read are reported and moved aside (checkpoint_fallback.py). A position
    that reads but does not fit this run's pipeline (e.g. another data.num_workers) is a
    `DataPositionError` that moves nothing: the checkpoint is sound. Returns (step, state,
    saved config dict).
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    items = {STATE: ocp.args.PyTreeRestore(target, restore_args=restore_args),
             CONFIG: ocp.args.JsonRestore()}

    def read(s):
        restored = manager.restore(s, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            try:
                manager.restore(s, args=ocp.args.Composite(
                    **{DATA: grain.checkpoint.CheckpointRestore(data_iterator)}))
            except Exception as e:  # noqa: BLE001 - grain raises KeyError/IndexError/ValueError
                if not _positions_parse(runs.user_path(str(manager.directory)) / str(s) / DATA):
                    raise  # missing or damaged: the step is unreadable
                raise DataPositionError(
                    f"checkpoint step {s} in {manager.directory} holds a data position this run's "
                    f"pipeline cannot take ({one_line(e)}); was data.num_workers or another "
                    "data.* setting changed? Resume with the run's data settings, or start a "
                    f"new --workdir with train.init_from={manager.directory}/{s}") from e
        return restored

    if step is None:
        step, restored = newest_readable(manager, read, move_aside=True)
    else:
        restored = read(step)
    return step, restored[STATE], restored[CONFIG]


def _positions_parse(folder) -> bool:
    """Whether a step's saved data positions (one JSON file per process) exist and parse."""
    files = list(folder.glob(DATA_POSITIONS)) if folder.is_dir() else []
    try:
        return bool(files) and all(isinstance(json.loads(f.read_text()), dict) for f in files)
    except ValueError:
        return False


def saved_config(manager: ocp.CheckpointManager, step: int | None = None) -> dict:
    """The config dict stored with a checkpoint (to compare model shapes before restoring): the
    given step's, else the newest one whose config reads."""
    read = lambda s: manager.restore(s, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    if step is None:
        return newest_readable(manager, read)[1][CONFIG]
    return read(step)[CONFIG]


def latest_step(workdir: str) -> int:
    """The newest step folder of a run's checkpoints/ (FileNotFoundError when it has none)."""
    folder = runs.checkpoints_dir(workdir)
    steps = [int(d.name) for d in folder.iterdir() if d.name.isdigit()] if folder.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {folder}: train first")
    return max(steps)


def _reader(workdir: str, which: str):
    """(read-only manager, read(step) -> {STATE: {which: weights}, CONFIG}) of a run's checkpoints/.

    Only the state's `which` subtree is read, into host numpy arrays: using a run's weights needs
    neither its optimizer state (twice the weights under AdamW) nor the devices it was saved
    from (a run trained on a pod is read on one GPU; a target-less restore refused that as a
    topology mismatch). A state without `which` reads as {} (the caller names what it has)."""
    path = runs.checkpoints_dir(workdir)
    if not path.is_dir():
        raise FileNotFoundError(f"workdir {workdir!r} has no checkpoints/ folder: train first")
    manager = ocp.CheckpointManager(
        path, item_names=(STATE, CONFIG),
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))

    def read(s):
        saved = manager.item_metadata(s)[STATE]
        item = {k: saved[k] for k in (which,) if k in saved}
        on_host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return manager.restore(s, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item, restore_args=on_host, partial_restore=True),
            CONFIG: ocp.args.JsonRestore()}))
    return manager, read


def read_config(workdir: str, step: int | None = None) -> dict:
    """The config dict saved with a run's checkpoint (the given step's, else the newest one whose
    config reads), no weights read."""
    manager, _ = _reader(workdir, "ema")
    try:
        return saved_config(manager, step)
    finally:
        manager.close()


def load_params(workdir: str, which: str = "ema", step: int | None = None) -> tuple[Any, dict]:
    """(parameters, config dict) of a run for inference: the EMA (or raw) weights as host numpy
    arrays, whatever devices the run was saved from; nothing else of the state is read.
    """
    return load_step_params(workdir, which, step)[1:]


def load_step_params(workdir: str, which: str = "ema",
                     step: int | None = None) -> tuple[int, Any, dict]:
    """(step, parameters, config dict) as `load_params` reads them; `step` None: the newest step
    whose `which` weights and config read (unreadable newer ones are reported, left in place)."""
    path = runs.checkpoints_dir(workdir)
    manager, read = _reader(workdir, which)
    if step is None:  # the newest readable step; unreadable newer ones are reported, left in place
        step, restored = newest_readable(manager, read)
    else:
        try:
            restored = read(step)
        except (FileNotFoundError, KeyError):
            raise
        except Exception as e:  # noqa: BLE001 - orbax / JSON errors name no path
            others = sorted((s for s in manager.all_steps() if s != step), reverse=True)
            raise ValueError(f"checkpoint step folder {path / str(step)} cannot be read "
                             f"({one_line(e)}); restore it, or name another step folder of the "
                             f"run (steps there: {others or 'none'})") from e
    state = restored[STATE]
    if which not in state:
        has = sorted(manager.item_metadata(step)[STATE])
        raise KeyError(f"checkpoint {path} step {step} has no {which!r} (has {has})")
    return step, state[which], restored[CONFIG]
