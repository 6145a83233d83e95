"""The DiT trainer's step loop: dispatch, metrics a step late, checkpoints, profiler window.

The host never waits on the step it has just dispatched: step s+1 is queued (JAX dispatch is
asynchronous) before step s's outputs are fetched, so the device always has the next step to run
while the host logs. The host waits on the current step only where it must: before a checkpoint
(a save never comes from a step whose loss was not finite), at periodic samples and at the end.
Each logged step reports `step_time` (wall time from the previous step's fetch to this one's:
the device's step time once the loop is steady) apart from `data_time` (the host's wait for the
batch), so a slow input pipeline shows as such.

`train.profile_steps` > 0 writes a `jax.profiler` trace of that many steps, after
`train.profile_skip` steps (compile and warm-up), to `<workdir>/profile/` (TensorBoard's profile
plugin or Perfetto read it). Flax runs every module under a named scope (`flax_profile`), so the
trace names the DiT's blocks, their attention and MLP.

Preemption (spot TPU VMs, SLURM): a SIGTERM is noted, and at the next step boundary the loop saves
a checkpoint of the step it reached (with the data position, as periodic saves), waits for it and
stops with `PreemptedError` (`vdit train` exits with 143, 128 + SIGTERM, as a terminated job would);
rerunning the same command resumes there. One process installs its own SIGTERM handler for the
run (the previous one is restored after). Several processes use JAX's preemption sync service
(on by default with `jax.distributed`; it catches SIGTERM itself): all hosts stop at the step it
agrees on, so they save the same one.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from vdit import runs
from vdit.data import pipeline
from vdit.runs import checkpoint
from vdit.runs.checkpoint_fallback import check_saves, save_errors

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""

    exit_code = 3  # `vdit train` exits with it (vdit/cli_errors.py): diverged, not misconfigured


def nonfinite_message(step: int, bad: int, limit: int, last_finite: tuple | None) -> str:
    """Why a run stopped after `bad` non-finite steps in a row (`vdit train` and `train-vae`);
    `last_finite` = (step, loss) of the last finite one, or None."""
    last = ("no step had a finite loss" if last_finite is None
            else f"last finite loss {last_finite[1]:.6g} at step {last_finite[0]}")
    return (f"step {step}: {bad} consecutive steps with a non-finite loss or gradient "
            f"(limit train.max_bad_steps={limit}; {last}); updates were skipped and no "
            "checkpoint was saved from them: lower optim.lr or check the data, then rerun to "
            "resume from the last checkpoint")


class PreemptedError(RuntimeError):
    """The run got SIGTERM (preemption) and stopped at a step boundary after saving it."""

    exit_code = 143  # `vdit train` exits with it (vdit/cli_errors.py): 128 + SIGTERM, as schedulers
    # expect of a terminated job (a requeue policy keyed on it still applies)


class _Preemption:
    """Whether a preemption notice (SIGTERM) has come, asked at each step boundary."""

    def __init__(self):
        self.requested = False
        self.multihost = jax.process_count() > 1
        self._previous = None
        self._installed = False

    def __enter__(self):
        # signal.signal works only on the main thread; several hosts use JAX's service, whose
        # C++ SIGTERM handler a Python one would replace.
        if not self.multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._notice)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _notice(self, signum, frame) -> None:
        self.requested = True  # acted on at the next step boundary (nothing else is safe here)

    def reached(self, manager, step: int) -> bool:
        """True at the step to save and stop at: the first one after a SIGTERM here, the one all
        hosts agreed on with several processes. Called at every step (the service needs it)."""
        if self.multihost:
            return manager.reached_preemption(step)  # False when JAX's service is off
        return self.requested


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose outputs have not been fetched yet."""

    step: int  # 1-based: the state's step after it
    out: dict  # device arrays
    data_time: float


class _Profile:
    """Starts and stops one jax.profiler trace over the configured window of steps."""

    def __init__(self, config, workdir: str, start: int):
        count = int(config.train.get("profile_steps", 0) or 0)
        first = start + int(config.train.get("profile_skip", 3))
        self.window = (first, first + count) if count > 0 else None
        self.folder = str(runs.profile_dir(workdir))
        self.active = False

    def at(self, step: int) -> None:
        """Called before step index `step` (0-based) is dispatched."""
        if self.window is None:
            return
        if step == self.window[0] and jax.process_index() == 0:
            jax.profiler.start_trace(self.folder)
            self.active = True
        elif step == self.window[1]:
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d-%d written to %s", self.window[0] + 1, self.window[1],
                     self.folder)


class StepLoop:
    """Runs steps [start, end) of a compiled train step; `run` returns the logged metrics."""

    def __init__(self, compiled, flops: float, mesh, manager, writer, config, workdir: str,
                 samples):
        self.compiled, self.mesh, self.manager = compiled, mesh, manager
        self.writer, self.config, self.samples = writer, config, samples
        self.workdir = workdir
        self.peak_flops = float(config.train.peak_flops_per_device) * jax.device_count()
        self.flops = flops
        self.history: list[dict] = []
        self.last_finite = None
        self.bad_streak = 0
        self.last_fetch = time.perf_counter()

    def run(self, state, frozen, data_it, source, start: int, end: int) -> list[dict]:
        cfg = self.config
        bar = tqdm(range(start, end), initial=start, total=cfg.train.steps, desc="train",
                   disable=jax.process_index() != 0 or not cfg.train.progress)
        profile = _Profile(cfg, self.workdir, start)
        pending = None
        self.last_fetch = time.perf_counter()
        with _Preemption() as preemption:
            try:
                for step in bar:
                    profile.at(step)
                    t0 = time.perf_counter()
                    batch = pipeline.to_global(next(data_it), self.mesh)
                    data_time = time.perf_counter() - t0
                    state, out = self.compiled(state, frozen, batch)  # queued, not waited on
                    if pending is not None:  # the previous step: finished or about to
                        self._record(pending, source, bar)
                    pending = _Pending(step + 1, out, data_time)
                    s = step + 1
                    due = s % cfg.checkpoint.every == 0 or s == cfg.train.steps
                    preempted = preemption.reached(self.manager, s)
                    if due or s == end or preempted:
                        self._record(pending, source, bar)
                        pending = None
                    if due or preempted:
                        self._save(state, data_it, s)
                    check_saves(self.manager, s, wait=preempted)
                    if preempted:
                        raise PreemptedError(self._preempted_message(s))
                    if self.samples is not None:
                        self.samples.maybe_write(s, state.ema, frozen, self.writer)
            finally:
                profile.stop()
        check_saves(self.manager, end, wait=True)
        return self.history

    def _record(self, pending: _Pending, source, bar) -> None:
        """Fetches a step's outputs, logs them and stops a diverged run."""
        out = jax.device_get(pending.out)
        now = time.perf_counter()
        seconds, self.last_fetch = now - self.last_fetch, now
        s, loss = pending.step, float(out["loss"])
        metrics = {"loss": out["loss"], "grad_norm": out["grad_norm"], "step_time": seconds,
                   "data_time": pending.data_time, "tokens_per_s": out["tokens"] / seconds,
                   "data/skipped": source.skipped, "nonfinite_total": int(out["bad_total"])}
        if self.peak_flops > 0:
            metrics["mfu"] = self.flops / seconds / self.peak_flops
        metrics.update({k: out[k] for k in ("loss_high", "loss_low") if k in out})  # two experts
        self.history.append({"step": s, **metrics})
        if np.isfinite(loss):
            self.last_finite = (s, loss)
        if s % self.config.train.log_every == 0 or s == self.config.train.steps:
            self.writer.write(s, metrics)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        self.bad_streak = bad = int(out["bad_streak"])
        if bad >= self.config.train.max_bad_steps:
            check_saves(self.manager, s, wait=True)
            raise NonFiniteError(self._nonfinite_message(s, bad))

    def _save(self, state, data_it, step: int) -> None:
        if self.bad_streak == 0:  # never a checkpoint from a step whose loss was not finite
            with save_errors(self.manager, step):
                checkpoint.save(self.manager, step, state, self.config, data_it)
        else:
            log.warning("step %d: not saving a checkpoint (%d non-finite steps in a row)", step,
                        self.bad_streak)

    def _preempted_message(self, step: int) -> str:
        saved = self.manager.latest_step()
        where = (f"checkpoint of step {step} saved" if saved == step else
                 "no checkpoint saved from a non-finite step; the last one is "
                 f"{'none' if saved is None else f'step {saved}'}")
        return (f"preempted at step {step} (SIGTERM): {where}; rerun the same command to resume")

    def _nonfinite_message(self, step: int, bad: int) -> str:
        return nonfinite_message(step, bad, self.config.train.max_bad_steps, self.last_finite)
