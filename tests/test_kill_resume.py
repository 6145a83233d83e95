"""`vdit train` killed with SIGKILL (once while an async checkpoint save is in flight, once between
saves) and restarted until done logs exactly the losses of an uninterrupted run, steps re-run after
the last good checkpoint included; the checkpoint left by a kill loads."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from train_testing import CONFIGS, TINY, VIDEOS, write_shards

from vdit.config import load_config
from vdit.runs import checkpoint
from vdit.train import loop
from vdit.train.metrics import read_metrics

CONFIG = os.path.join(CONFIGS, "shapes_dit.py")
STEPS = 12
RUN = [*TINY, f"--config.train.steps={STEPS}", "--config.checkpoint.every=2",
       "--config.checkpoint.async_save=True", "--config.checkpoint.keep=2",
       "--config.data.prefetch=2", "--config.train.i2v_rate=0.0"]  # shards carry no I2V latents
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _env() -> dict:
    """This process's XLA flags (8 CPU devices), precision and compilation cache: the trainer
    subprocesses load the step the in-process reference run compiled. Every program is cached
    (threshold 0): Orbax's first save compiles many small per-device slices, once for all runs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env |= {"JAX_COMPILATION_CACHE_DIR": cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return env


def _start(workdir: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vdit", "train", "--config", CONFIG, "--workdir", workdir, *RUN,
           f"--config.data.latents_dir={workdir}/latents"]
    log = open(os.path.join(workdir, "train.log"), "a")  # noqa: SIM115
    return subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _log(workdir: str) -> str:
    with open(os.path.join(workdir, "train.log")) as f:
        return f.read()[-4000:]


def _kill_when(proc: subprocess.Popen, workdir: str, ready, timeout: float = 180.0):
    """SIGKILLs `proc` as soon as `ready()` returns a truthy value (polled); returns that value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = ready()
        if found:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return found
        assert proc.poll() is None, f"trainer ended before the kill point:\n{_log(workdir)}"
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"kill point not reached in {timeout:.0f}s:\n{_log(workdir)}")


def _saving(workdir: str) -> str | None:
    """The temporary folder of an async save in flight, once a completed checkpoint exists."""
    folder = os.path.join(workdir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if not any(n.isdigit() for n in names):
        return None
    return next((n for n in names if n.endswith(TMP_SUFFIX)), None)


def _latest_loads(workdir: str) -> int:
    """The latest complete checkpoint's step, after checking its EMA weights load and are finite."""
    complete = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
    ema, _ = checkpoint.load_params(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ema))
    return max(complete)


def _logged_step(workdir: str, since: float, step: int):
    """True once a row for `step` was logged after time `since` (a resume rewrites the file:
    replayed steps replace their rows)."""
    return lambda: any(r["step"] == step and r["time"] > since for r in read_metrics(workdir))


def _finish(proc: subprocess.Popen, workdir: str) -> None:
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"trainer failed:\n{_log(workdir)}"


def test_sigkill_during_async_save_and_training_resumes_exactly(tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    for workdir in (ref, run):
        write_shards(os.path.join(workdir, "latents"), VIDEOS)
    loop.train(load_config(CONFIG, [*RUN, f"--config.data.latents_dir={ref}/latents"]), ref)
    want = {r["step"]: r["loss"] for r in read_metrics(ref)}
    assert sorted(want) == list(range(1, STEPS + 1))

    # 1. Killed while an async save is writing: its temporary folder stays, the latest complete
    #    checkpoint is the previous one, and it loads.
    in_flight = _kill_when(_start(run), run, lambda: _saving(run))
    assert os.path.isdir(os.path.join(run, "checkpoints", in_flight)), "save finished before kill"
    saved = int(in_flight.split(".")[0])
    assert _latest_loads(run) == saved - 2

    # 2. Restarted, then killed mid-training: as soon as the step after the re-saved one is logged.
    _kill_when(_start(run), run, _logged_step(run, time.time(), saved + 1))
    assert _latest_loads(run) >= saved - 2

    # 3. Restarted to the end.
    _finish(_start(run), run)
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.endswith(TMP_SUFFIX)]
    got = read_metrics(run)
    # kills re-ran the steps after the last good checkpoint; their rows were replaced
    assert [r["step"] for r in got] == sorted(want)
    np.testing.assert_allclose([r["loss"] for r in got], [want[r["step"]] for r in got],
                               rtol=1e-6, atol=1e-7)
    final, _ = checkpoint.load_params(run)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(checkpoint.load_params(ref)[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
