"""Checkpoints that degrade gracefully: read the newest readable step; stop at once on a failed save.

`newest_readable(manager, read)` calls `read(step)` from the newest step down. An unreadable step
(truncated or zeroed data file, missing state/ or data/, an empty step folder) is reported in one
line on stderr and the next older one is tried. With `move_aside` (training, which will write that
step number again) the bad step folder is moved to `<workdir>/checkpoints.unreadable/` rather than
deleted; readers (sampling) only report. `check_saves` turns a failed asynchronous save into
`CheckpointSaveError` right after the step that notices it, so a run never trains on past it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import orbax.checkpoint as ocp

from vdit import runs

ASIDE = "checkpoints.unreadable"


class CheckpointSaveError(RuntimeError):
    """An (asynchronous) checkpoint save failed; the run stops."""


class DataPositionError(ValueError):
    """A checkpoint reads, but its saved data position does not fit the run's data pipeline."""


class StateMismatchError(ValueError):
    """A checkpoint reads, but holds a state of another structure than the run's (settings that
    shape the optimizer state or the model changed): not damage, so nothing is moved aside."""


class NoReadableCheckpointError(FileNotFoundError):
    """Every checkpoint step of a run failed to read."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, at most `limit` characters."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    # TensorStore appends "See full TensorStore details: <bound method ...>": no use to a reader
    first = first.split(" See full TensorStore details")[0]
    return f"{type(error).__name__}: {first[:limit]}"


def step_dirs(directory: str) -> list[int]:
    """Step numbers of the folders under `directory` (finished or not), newest first."""
    folder = runs.user_path(directory)
    if not folder.is_dir():
        return []
    return sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()),
                  reverse=True)


def newest_readable(manager: ocp.CheckpointManager, read: Callable[[int], Any],
                    move_aside: bool = False) -> tuple[int, Any]:
    """(step, read(step)) for the newest step that reads; unreadable ones are reported (and moved
    aside when `move_aside`). Step folders orbax does not list (e.g. empty) count as unreadable."""
    directory = str(manager.directory)
    steps = sorted(set(manager.all_steps()) | set(step_dirs(directory)), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}: train first")
    listed = set(manager.all_steps())
    failures = []
    for i, step in enumerate(steps):
        try:
            if step not in listed:
                raise FileNotFoundError(f"step folder {step} is not a complete checkpoint")
            result = read(step)
        except DataPositionError:
            raise  # the step reads; the run's settings do not fit it (nothing to fall back from)
        except ValueError as e:
            if "tree structures do not match" not in str(e):  # orbax's words for it
                failures.append(_unreadable(directory, steps, i, e, move_aside))
                continue
            raise StateMismatchError(
                f"checkpoint step {step} in {directory} holds a training state of another "
                f"structure than this run's ({one_line(e, 120)}): a setting that shapes the "
                "optimizer state or the model changed since it was saved. Nothing was moved; "
                "resume with the settings the run was started with, or start a new --workdir "
                "(train.init_from takes its weights)") from e
        except Exception as e:  # noqa: BLE001 - any unreadable step falls back to an older one
            failures.append(_unreadable(directory, steps, i, e, move_aside))
            continue
        if move_aside and failures:
            manager.reload()
        return step, result
    raise NoReadableCheckpointError(f"no readable checkpoint in {directory}: "
                                    + "; ".join(failures))


def _unreadable(directory: str, steps: list[int], i: int, error: Exception,
                move_aside: bool) -> str:
    """Reports step `steps[i]` as unreadable (moved aside when `move_aside`); its failure line."""
    step = steps[i]
    nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older step"
    where = _move_aside(directory, step) if move_aside else "left in place"
    print(f"vdit: checkpoint step {step} in {directory} is unreadable ({one_line(error)}); "
          f"{where}; {nxt}", file=sys.stderr, flush=True)
    return f"step {step} ({one_line(error)})"


def _move_aside(directory: str, step: int) -> str:
    src = runs.user_path(directory) / str(step)
    if not src.is_dir():
        return "not on disk"
    dst = src.parent.parent / ASIDE / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
    return f"moved to {dst}"


def check_saves(manager: ocp.CheckpointManager, step: int, wait: bool = False) -> None:
    """Raises CheckpointSaveError if a save has failed so far (after waiting for the pending one
    when `wait`)."""
    with save_errors(manager, step):
        if wait or not manager.is_saving_in_progress():
            # A failed background write is held by orbax's finalize thread, which its own
            # check_for_errors has already cleared; waiting on the finished thread raises it.
            manager.wait_until_finished()
        manager.check_for_errors()


@contextlib.contextmanager
def save_errors(manager: ocp.CheckpointManager, step: int) -> Iterator[None]:
    """Turns any failure of starting or checking a save into CheckpointSaveError (a save waits
    for the previous one, so an earlier failure can surface there)."""
    try:
        yield
    except CheckpointSaveError:
        raise
    except Exception as e:  # noqa: BLE001 - every save failure stops the run with one message
        raise CheckpointSaveError(
            f"saving a checkpoint in {manager.directory} failed ({one_line(e)}); the run stopped "
            f"at step {step}. Earlier checkpoints are intact: fix the cause (disk space, "
            "permissions) and rerun the same command to resume") from e
