"""`vdit train-vae`: trains the causal video VAE on the synthetic shapes world (or any pixel
source), with mixed image and video batches, L1 and/or L2 reconstruction + KL (+ optional
perceptual/adversarial terms, not built: asking for them is an error), PSNR in the log, Orbax
checkpoints, resumable.

Config sections: `vae` (the architecture), `data` (the synthetic world), `vae_train`:
  steps, batch_size, shapes (list of (frames, height, width); step i uses shapes[i % len]),
  l1_weight, l2_weight (reconstruction: L2 optimises PSNR directly and learns small objects far
  faster than L1, whose median-seeking gradient first paints the background), kl_weight,
  perceptual_weight, adversarial_weight (must be 0), seed, log_every, eval_every, eval_examples,
  ema_decay; plus `optim` and `checkpoint` as for the DiT.
Divergence is handled as by `vdit train` (vdit/train/step_loop.py): a non-finite step's update is
skipped, no checkpoint is saved from it, and `train.max_bad_steps` consecutive ones stop the run
with `NonFiniteError` (exit 3) naming the step and the last finite loss.
Batches are a pure function of the step, so a resumed run sees exactly the data it would have.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vdit.data.synthetic import SyntheticShapes
from vdit.models.vae import init_params, kl_divergence, sample_posterior
from vdit.models.vae_config import vae_from_config
from vdit.parallel.mesh import logical_rules, mesh_from_config
from vdit.runs import checkpoint
from vdit.runs.checkpoint_fallback import check_saves, save_errors
from vdit.train import config_checks, optim
from vdit.train.lock import workdir_lock
from vdit.train.loop import check_resume_compatible
from vdit.train.metrics import MetricsWriter, drop_rows_after
from vdit.train.preflight import check_workdir
from vdit.train.state import create_state
from vdit.train.step import make_train_step
from vdit.train.step_loop import NonFiniteError, nonfinite_message

log = logging.getLogger(__name__)


def psnr(x, y) -> jax.Array:
    """PSNR in dB for signals in [-1, 1] (peak-to-peak 2)."""
    mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - y))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def make_vae_loss(vae, cfg):
    if cfg.perceptual_weight or cfg.adversarial_weight:
        raise ValueError("config keys 'vae_train.perceptual_weight' / 'adversarial_weight' must be 0: "
                         "perceptual and adversarial VAE losses are not built in this version")

    def loss_fn(params, frozen, video, rng):
        # Whole-clip (not chunked) passes: same numbers, and XLA:CPU differentiates the chunk
        # scan with its carried caches two orders of magnitude slower.
        mean, logvar = vae.apply({"params": params}, video, method="encode", chunked=False)
        z = sample_posterior(rng, mean, logvar)
        recon = vae.apply({"params": params}, z, method="decode", chunked=False, clamp=False)
        l1 = jnp.mean(jnp.abs(recon - video))
        l2 = jnp.mean(jnp.square(recon - video))
        kl = jnp.mean(kl_divergence(mean, logvar))
        loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.kl_weight * kl
        return loss, {"l1": l1, "l2": l2, "kl": kl, "psnr": psnr(recon, video)}

    return loss_fn


def batch_for_step(data: SyntheticShapes, cfg, step: int, offset: int = 0) -> np.ndarray:
    frames, height, width = cfg.shapes[step % len(cfg.shapes)]
    start = offset + step * cfg.batch_size
    return np.stack([data.render(i, frames=frames, height=height, width=width)["video"]
                     for i in range(start, start + cfg.batch_size)])


def make_evaluate(vae):
    """evaluate(params, data, cfg) -> mean PSNR of the posterior-mean reconstruction over the
    held-out clips of every shape; the reconstruction compiles once per shape, not per call."""
    @jax.jit
    def batch_psnr(p, v):
        mean, _ = vae.apply({"params": p}, v, method="encode")
        return psnr(vae.apply({"params": p}, mean, method="decode"), v)

    def evaluate(params, data: SyntheticShapes, cfg) -> float:
        batches = max(1, math.ceil(cfg.eval_examples / cfg.batch_size))
        held_out = len(data) - batches * cfg.batch_size  # the last clips: no step reaches them
        if held_out < cfg.steps * cfg.batch_size:
            raise ValueError(f"config key 'data.num_examples' = {len(data)} leaves no held-out "
                             f"clips after {cfg.steps} steps of {cfg.batch_size}")
        return float(np.mean([float(batch_psnr(params, jnp.asarray(
            batch_for_step(data, cfg, b, offset=held_out)))) for b in range(batches)]))

    return evaluate


class _Divergence:
    """The last finite loss and the current run of non-finite steps, noted after each step."""

    def __init__(self, limit: int):
        self.limit, self.streak, self.last_finite = limit, 0, None

    def record(self, step: int, out: dict) -> bool:
        """Notes step `step` (1-based); True when it ends `limit` non-finite steps in a row."""
        if math.isfinite(out["loss"]):
            self.last_finite = (step, out["loss"])
        self.streak = int(out["bad_streak"])  # the state's count: it carries over a resume
        return self.streak >= self.limit

    def error(self, step: int) -> NonFiniteError:
        return NonFiniteError(nonfinite_message(step, self.streak, self.limit, self.last_finite))


def train_vae(config, workdir: str) -> dict:
    """Trains (or resumes) to `vae_train.steps`; returns {"history": [...], "eval_psnr": float}.
    Process 0 holds the workdir's lock (vdit/train/lock.py) for the whole run."""
    check_workdir(workdir)
    with workdir_lock(workdir, jax.process_index()):
        return _train_vae(config, workdir)


def _train_vae(config, workdir: str) -> dict:
    cfg = config.vae_train
    config_checks.check_accumulation(config, "vae_train.steps")
    mesh = mesh_from_config(config.mesh)
    rules = logical_rules("vae", config.mesh.get("rules", None))
    vae = vae_from_config(config.vae)
    data = SyntheticShapes.from_config(config.data)
    tx = optim.make_optimizer(config.optim, cfg.steps)
    # rbg draws (vae.init_params): threefry would cost a minute of compile on CPU
    init = lambda r: init_params(vae, r)
    state, shardings = create_state(init, tx, jax.random.key(cfg.seed), mesh, rules)

    manager = checkpoint.make_manager(workdir, config.checkpoint, with_data=False)
    start = 0
    if manager.latest_step() is not None:
        check_resume_compatible(checkpoint.saved_config(manager), config, sections=("vae",))
        start, state, _ = checkpoint.restore(manager, state)
        log.info("resumed VAE training from step %d", start)
    if start >= cfg.steps:  # a requeued finished job: said, evaluated, nothing written
        if jax.process_index() == 0:
            print(f"vdit train-vae: the checkpoint in {workdir} is at step {start}, already at "
                  f"vae_train.steps={cfg.steps}: nothing to train (raise "
                  "--config.vae_train.steps to train on)", flush=True)
        return {"history": [], "eval_psnr": make_evaluate(vae)(state.ema, data, cfg),
                "state": state}
    if jax.process_index() == 0:  # replayed steps replace their rows (one row per step)
        drop_rows_after(workdir, start)
    step_fn = jax.jit(make_train_step(make_vae_loss(vae, cfg), tx, cfg.ema_decay),
                      out_shardings=(shardings, None), donate_argnums=(0,))
    writer = MetricsWriter(workdir, tensorboard=config.train.tensorboard, start_step=start)
    evaluate = make_evaluate(vae)
    history = []
    divergence = _Divergence(int(config.train.max_bad_steps))
    try:  # closed however the run stops (a failed save too): its last events reach the files
        for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps,
                         desc="train-vae", disable=jax.process_index() != 0 or not config.train.progress):
            video = jnp.asarray(batch_for_step(data, cfg, step))
            state, out = step_fn(state, {}, video)
            out = {k: float(v) for k, v in jax.device_get(out).items() if k != "finite"}
            history.append({"step": step + 1, **out})
            if (step + 1) % cfg.log_every == 0:
                writer.write(step + 1, out)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                writer.write(step + 1, {"eval/psnr": evaluate(state.ema, data, cfg)})
            if divergence.record(step + 1, out):
                check_saves(manager, step + 1, wait=True)  # an earlier save's failure first
                raise divergence.error(step + 1)
            due = (step + 1) % config.checkpoint.every == 0 or step + 1 == cfg.steps
            if due and divergence.streak:  # never a checkpoint from a non-finite step
                log.warning("step %d: not saving a checkpoint (%d non-finite steps in a row)",
                            step + 1, divergence.streak)
            elif due:
                with save_errors(manager, step + 1):
                    checkpoint.save(manager, step + 1, state, config)
            check_saves(manager, step + 1)
        check_saves(manager, cfg.steps, wait=True)
        score = evaluate(state.ema, data, cfg)
        writer.write(cfg.steps, {"eval/psnr": score})  # joins that step's row, if logged
    finally:
        writer.close()
    return {"history": history, "eval_psnr": score, "state": state}
