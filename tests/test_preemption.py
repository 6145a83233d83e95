"""Preemption (vdit/train/step_loop.py): `vdit train` sent SIGTERM mid-run (spot VMs, SLURM) saves
a checkpoint of the step it reached, exits 143 with the message saying so, and the same command
resumes from that step; several processes defer to JAX's preemption sync service."""

import os
import signal
import threading
import time

import jax
from train_testing import CONFIGS, TINY, VIDEOS, write_shards

from vdit import cli
from vdit.train import step_loop
from vdit.train.metrics import read_metrics

STEPS = 12
# No periodic save before the end: without preemption handling a SIGTERM loses every step.
RUN = [*TINY, f"--config.train.steps={STEPS}", "--config.checkpoint.every=100",
       "--config.checkpoint.async_save=True", "--config.train.i2v_rate=0.0"]


def _steps(workdir: str) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _sigterm_after_step(workdir: str, step: int) -> threading.Thread:
    """Sends this process SIGTERM once metrics.jsonl has a row for `step` (as a scheduler would,
    from outside the training loop); the handler runs on the main thread."""
    def watch():
        end = time.monotonic() + 600
        while time.monotonic() < end and not any(r["step"] >= step
                                                 for r in read_metrics(workdir)):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigterm_saves_the_step_reached_and_the_rerun_resumes_there(tmp_path, capsys):
    """`vdit train` in this process (the CLI's own error path and exit status), SIGTERM sent from
    another thread mid-run, then the same command again."""
    workdir = str(tmp_path)
    write_shards(os.path.join(workdir, "latents"), VIDEOS)
    args = ["train", "--config", os.path.join(CONFIGS, "shapes_dit.py"), "--workdir", workdir,
            *RUN, f"--config.data.latents_dir={workdir}/latents"]
    # A SIGTERM landing after the run restored the previous handler must fail this test, not
    # kill the test process: that previous handler only records it.
    late = []
    record = lambda *_: late.append(True)  # noqa: E731
    before = signal.signal(signal.SIGTERM, record)
    try:
        watcher = _sigterm_after_step(workdir, 2)
        code = cli.main(args)
        watcher.join()
        restored = signal.getsignal(signal.SIGTERM) is record  # the run's handler is gone
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not late, "the run ended before the SIGTERM came"
    err = capsys.readouterr().err
    assert code == step_loop.PreemptedError.exit_code == 143, err
    assert restored
    saved = _steps(workdir)
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, (saved, err)
    step = saved[0]
    assert (f"preempted at step {step} (SIGTERM): checkpoint of step {step} saved; rerun the "
            "same command to resume") in err
    assert max(r["step"] for r in read_metrics(workdir)) == step  # logged up to the save

    rerun = time.time()
    assert cli.main(args) == 0, capsys.readouterr().err
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # resumed at the saved step: the steps up to it kept their rows, the later ones are new
    assert [r["time"] > rerun for r in rows] == [r["step"] > step for r in rows]
    assert _steps(workdir)[-1] == STEPS


class _Manager:
    def __init__(self):
        self.asked = []

    def reached_preemption(self, step):
        self.asked.append(step)
        return step == 5


def test_handler_restored_and_several_hosts_use_jax_service(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    with step_loop._Preemption() as preemption:
        assert signal.getsignal(signal.SIGTERM) == preemption._notice
        assert not preemption.reached(_Manager(), 1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert preemption.reached(_Manager(), 2)
    assert signal.getsignal(signal.SIGTERM) == before

    # Several processes: JAX's service (its C++ SIGTERM handler) decides the step; no Python one.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    manager = _Manager()
    with step_loop._Preemption() as preemption:
        assert signal.getsignal(signal.SIGTERM) == before
        assert [preemption.reached(manager, s) for s in (4, 5)] == [False, True]
    assert manager.asked == [4, 5]
