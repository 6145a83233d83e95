"""Faults a long run meets: a corrupt newest checkpoint (resume and sampling fall back to the
previous step, the bad one is moved aside, never deleted), a failed save (the run stops at once),
two writers on one workdir or curate shard (the second refuses), a replayed step (one metrics row
per step), prompt words the text encoder does not know (one warning)."""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import atomicity
from train_testing import VIDEOS, tiny_config, train_tiny, write_shards

from vdit import cli
from vdit.models.tokenizers import WordTokenizer
from vdit.runs import checkpoint
from vdit.runs.checkpoint_fallback import (
    ASIDE,
    CheckpointSaveError,
    DataPositionError,
    StateMismatchError,
    newest_readable,
)
from vdit.sample_cli import warn_unknown_words
from vdit.train.lock import FolderLock, LockedError
from vdit.train.metrics import read_metrics


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained 4 steps: checkpoints at steps 2 and 4, one metrics row per step."""
    root = tmp_path_factory.mktemp("faults")
    latents = write_shards(str(root / "latents"), VIDEOS)
    workdir = str(root / "run")
    train_tiny("shapes_dit", workdir, latents, 4)
    return {"root": root, "latents": latents, "workdir": workdir}


def _data_files(step_dir):
    """The state's array data files (OCDBT's d/ folders). Which arrays share a file varies from
    save to save, so every one is damaged: no array of the step reads back."""
    files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state"))
             for n in names if os.path.basename(d) == "d"]
    assert files, f"no array data files under {step_dir}/state"
    return files


def _truncate(step_dir):
    for path in _data_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _zero(step_dir):
    for path in _data_files(step_dir):
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(b"\0" * size)


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)


CORRUPTIONS = {
    "truncated data file": _truncate,
    "zeroed data file": _zero,
    "deleted state": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "deleted data": lambda d: shutil.rmtree(os.path.join(d, "data")),
    "empty step folder": _empty,
}


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back(run, tmp_path, capfd, how):
    workdir = str(tmp_path / "run")
    shutil.copytree(run["workdir"], workdir)
    step4 = os.path.join(workdir, "checkpoints", "4")
    CORRUPTIONS[how](step4)
    capfd.readouterr()

    # Sampling reads weights only (state + config): a step whose data/ is gone still serves.
    ema, _ = checkpoint.load_params(workdir)
    want = 4 if how == "deleted data" else 2
    assert _same(ema, checkpoint.load_params(run["workdir"], step=want)[0])
    if want == 2:
        err = capfd.readouterr().err
        assert "checkpoint step 4" in err and "unreadable" in err and "left in place" in err
        assert os.path.isdir(step4)  # a reader never moves or deletes

    # Resuming falls back to step 2 and moves step 4 aside; one case also trains the replayed
    # step 3 (the others restore only: stop_after=0), which must match the original exactly.
    full = how == "truncated data file"
    history = train_tiny("shapes_dit", workdir, run["latents"], 1 if full else 0)
    err = capfd.readouterr().err
    assert "checkpoint step 4" in err and "moved to" in err and "trying step 2" in err
    aside = os.listdir(os.path.join(workdir, ASIDE))
    assert len(aside) == 1 and aside[0].startswith("4-")
    moved = sorted(os.listdir(os.path.join(workdir, ASIDE, aside[0])))
    if how in ("truncated data file", "zeroed data file"):  # moved whole, never deleted
        assert moved == sorted(os.listdir(os.path.join(run["workdir"], "checkpoints", "4")))
    if full:
        assert [h["step"] for h in history] == [3]
        reference = [r for r in read_metrics(run["workdir"]) if r["step"] == 3][0]
        np.testing.assert_allclose(history[0]["loss"], reference["loss"], rtol=1e-6)
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3][: 3 if full else 2]


def test_a_data_position_the_pipeline_cannot_take_moves_nothing(run, tmp_path):
    """A sound checkpoint whose saved data position does not fit the run's pipeline (what another
    data.num_workers gives) is an error naming the setting; no step is moved aside."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run["workdir"], workdir)
    data = os.path.join(workdir, "checkpoints", "4", checkpoint.DATA)
    for name in os.listdir(data):
        if name.startswith("process_"):
            with open(os.path.join(data, name), "w") as f:
                json.dump({"not": "a position of this pipeline"}, f)
    with pytest.raises(DataPositionError, match=r"step 4 .* data.num_workers"):
        train_tiny("shapes_dit", workdir, run["latents"], 0)
    assert not os.path.exists(os.path.join(workdir, ASIDE))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    with pytest.raises(ValueError, match=r"'data.num_workers' = 2, but the checkpoint saved the "
                                         r"data position of 0 workers"):
        train_tiny("shapes_dit", workdir, run["latents"], 0, "--config.data.num_workers=2")


def test_failed_save_stops_the_run_at_once(run, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        out = real_save(self, step, *args, **kwargs)
        if step == 2:
            self.vdit_test_failed = True
        return out

    def check_for_errors(self):
        if getattr(self, "vdit_test_failed", False):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", check_for_errors)
    with pytest.raises(CheckpointSaveError, match=r"No space left.*stopped at step 2"):
        train_tiny("shapes_dit", workdir, run["latents"], 4)
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]


def test_a_failed_background_write_stops_the_run_by_the_next_save(run, tmp_path, monkeypatch):
    """The write fails in orbax's background thread, as a full disk does: orbax's finalize
    thread keeps the error (its check_for_errors finds nothing), and the run trained on to the
    next save, which then died with orbax's raw message."""
    workdir = str(tmp_path / "run")
    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if os.path.basename(str(self.get_final()).rstrip("/")) == "2":
            raise OSError(28, "No space left on device")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    with pytest.raises(CheckpointSaveError, match=r"No space left.*stopped at step [234]\. "
                                                  r"Earlier checkpoints are intact"):
        train_tiny("shapes_dit", workdir, run["latents"], 8)
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "4"))


def test_resume_refuses_switching_clipping_or_accumulation(run, tmp_path, capsys):
    """They change the optimizer state's tree: the restore failed on every step, each was moved
    to checkpoints.unreadable/ as if damaged, and the next run started again from step 0."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run["workdir"], workdir)
    for flag, message in (("--config.optim.grad_accum=2", r"optim\.grad_accum: checkpoint 1 -> now 2"),
                          ("--config.optim.clip_norm=0.0", r"optim\.clip_norm: checkpoint 1\.0 -> now 0\.0")):
        with pytest.raises(ValueError, match=message + " switches gradient clipping or accumulation"):
            train_tiny("shapes_dit", workdir, run["latents"], 2, flag)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert not os.path.exists(os.path.join(workdir, ASIDE))
    # Any other state of another structure reads as such, not as damage: nothing is moved.
    manager = checkpoint.make_manager(workdir, tiny_config("shapes_dit", run["latents"]).checkpoint)
    mismatch = ValueError("User-provided restore item and on-disk value metadata tree "
                          "structures do not match: ...")
    with pytest.raises(StateMismatchError, match=r"step 4 .*another structure.*Nothing was moved"):
        newest_readable(manager, lambda step: (_ for _ in ()).throw(mismatch), move_aside=True)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def _live_pid():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_second_writer_refuses_and_stale_lock_is_taken_over(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    other = _live_pid()
    try:
        lock = os.path.join(workdir, "lock")
        with open(lock, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": other.pid, "since": 0}, f)
        argv = ["train", "--config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                  "shapes_dit.py"), "--workdir", workdir]
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert f"in use by pid {other.pid} on {socket.gethostname()}" in err
        assert "one writer at a time" in err
    finally:
        other.kill()
        other.wait()
    # the holder is gone: the lock is stale, taken over with a message, released at the end
    with FolderLock(lock, "workdir"):
        assert json.load(open(lock))["pid"] == os.getpid()
    assert "taking over a stale lock" in capsys.readouterr().out
    assert not os.path.exists(lock)
    with open(lock, "w") as f:  # another host: cannot be checked from here, so refused
        json.dump({"host": "elsewhere", "pid": 1, "since": 0}, f)
    with pytest.raises(LockedError, match=f"pid 1 on elsewhere.*delete {lock}"):
        FolderLock(lock, "workdir").acquire()


def test_two_curate_workers_on_one_shard(tmp_path):
    from vdit.curate.run import run_cli

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "v.mp4").write_bytes(b"")  # an input folder with a video to curate
    other = _live_pid()
    try:
        with open(out / ".lock-00000-of-00001", "w") as f:
            json.dump({"host": socket.gethostname(), "pid": other.pid, "since": 0}, f)
        args = argparse.Namespace(config=None, overrides=[], input=str(tmp_path / "in"),
                                  output=str(out), shard=0, num_shards=1)
        with pytest.raises(LockedError, match=r"curate shard 0/1 .* in use by pid"):
            run_cli(args)
    finally:
        other.kill()
        other.wait()
    assert not list(out.glob("clips-*"))  # the refused worker wrote nothing


def test_unknown_prompt_words_warn_once_with_a_suggestion(capsys):
    tok = WordTokenizer(["a", "red", "circle", "moving", "right", "blue", "square", "left"], 16)
    warnings = warn_unknown_words(tok, ["a red circle moving right", "a crimson circle 🚀"],
                                  "vdit")
    assert len(warnings) == 1
    line = capsys.readouterr().err.strip()
    assert line == warnings[0]
    assert "prompt 1" in line and "'crimson'" in line and "'🚀'" in line and "<unk>" in line
    assert warn_unknown_words(object(), ["anything"], "vdit") == []  # byte-level: no warning


def test_truncated_safetensors_is_named(tmp_path):
    from safetensors.numpy import save_file

    from vdit.convert.safetensors_io import read_tensors

    path = tmp_path / "model.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot read weights file .*model\.safetensors.*truncated"):
        read_tensors(str(tmp_path))


def test_unreadable_checkpoint_messages_are_one_readable_line():
    from vdit.runs.checkpoint_fallback import one_line

    error = Exception("Encountered error while reading array index: (slice(0, 6, 1),). See full "
                      "TensorStore details: <bound method pybind11_detail_function_record_v1_\nx")
    assert one_line(error) == ("Exception: Encountered error while reading array index: "
                               "(slice(0, 6, 1),).")
