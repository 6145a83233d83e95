"""The distillation losses of a flow-matching teacher with its classifier-free guidance baked in,
on the trainer's packed batches: piecewise regression onto the student's own few-step sampler
("window", the recipes' method), and consistency distillation (sCM / rCM's objective in the
rectified-flow parameterisation, i.e. MeanFlow with the end time fixed at 0, "continuous"; or its
LCM-style form, "discrete").

The student F(x_t, t) (the DiT, initialised from the teacher) is read as the average velocity
from t down to 0: its clean estimate f(x_t, t) = x_t - t F. Along the teacher's guided ODE
dx/dt = v_T(x, t) = v_u + w (v_c - v_u), f must stay constant (consistency); d f / dt = 0 gives
F = v_T - t dF/dt, and the student regresses on a stop-gradient target built from it:

  method "continuous": target = v_T - r t dF/dt, dF/dt = (dF/dx) v_T + dF/dt|_x from one
      `jax.jvp` through the student DiT (tangents v_T and 1; attention included);
  method "discrete": one teacher Euler step back to t' = t - delta, x' = x_t - (t - t') v_T, and
      target = v_T + r (t'/t) (F(x', t') - v_T), i.e. F such that f(x_t, t) = f(x', t'): the
      continuous target as delta -> 0, but bounded (a mix of v_T and the student's own output).

  method "window": piecewise (PeRFlow-style) distillation onto the student's own sampler: the
      N-step deterministic sampler (ConsistencySampler, gamma 0: Euler steps with F) visits the
      times t_0 = 1 > ... > t_{N-1} > t_N = 0, and F at the start of window [t_i, t_{i+1}] must
      be the teacher's average guided velocity across it. A segment draws its window i, starts
      at x = (1 - t_i) x0 + t_i eps from its data, the teacher solves its guided ODE across the
      window in `distill.teacher_substeps` Euler steps (the teacher's N*substeps-step grid of the
      same shift), and target = (x - x_end) / (t_i - t_{i+1}). A plain regression: its optimum
      is the teacher's solver, window by window, with no bootstrapping from the student.
      `distill.window_start` "student" starts each window where the student's own sampler,
      from fresh noise, arrives instead (no gradient; the clip's data then only gives the
      caption): the target then corrects the student's drift, as a sampler meets it.

`r` ramps from 0 to 1 over `distill.tangent_warmup` steps (sCM's tangent warmup): at r = 0 the
target is the guided teacher velocity itself (guidance distillation), which keeps the first steps
near the teacher. Each segment's term is divided by sg(its own value + `distill.weight_eps`)
(MeanFlow's adaptive weight; sCM normalises its tangent the same way): Wan's timestep embedding
sees 1000 t, so dF/dt of a young model is in the hundreds, and one large tangent must not swamp a
batch. The reported loss is the plain mean squared error; its gradient is the weighted one's.

The teacher's DiT is `frozen["teacher"]` (full-weight student, params["dit"]) or, under LoRA, the
frozen base `frozen["dit"]` with the student = base + adapters. The unconditional branch reads
the empty caption, packed once per segment (token ids, as the trainer's text).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import text_pad_to
from vdit.diffusion import flow
from vdit.diffusion.samplers_consistency import consistency_times
from vdit.models import lora
from vdit.train import conditioning
from vdit.train.objective import encode_packed_text
from vdit.train.step import LOSS_WEIGHT


def null_text(null_ids: np.ndarray, rows: int, num_segments: int) -> dict:
    """The empty caption once per segment: {"text" [B, K*n] ids, "text_segment_ids" [B, K*n]}."""
    n = len(null_ids)
    ids = np.tile(np.asarray(null_ids, np.int32), num_segments)
    seg = np.repeat(np.arange(1, num_segments + 1, dtype=np.int32), n)
    return {"text": jnp.asarray(np.broadcast_to(ids, (rows, ids.size))),
            "text_segment_ids": jnp.asarray(np.broadcast_to(seg, (rows, seg.size)))}


def tangent_ramp(step, warmup: int) -> jax.Array:
    """r in [0, 1]: the share of the consistency term in the target at update `step`."""
    if warmup <= 0:
        return jnp.float32(1.0)
    return jnp.clip(jnp.asarray(step, jnp.float32) / warmup, 0.0, 1.0)


def student_and_teacher(params: dict, frozen: dict, config) -> tuple[dict, dict]:
    """(student DiT params, teacher DiT params) from the trainer's trainable/frozen split."""
    if lora.enabled(config):
        base = frozen["dit"]
        return lora.merge_lora(base, params["lora"], config.lora), base
    return params["dit"], frozen["teacher"]


def forward_mode_model(dit):
    """The DiT that `jax.jvp` can pass: bfloat16 matmuls (`model.matmul_dtype`) carry a custom
    backward pass (vdit/models/mixed_dot.py), which forward-mode autodiff cannot go through, so
    the continuous target's jvp runs the same weights with float32 matmuls."""
    return dit.clone(matmul_dtype=None) if dit.matmul_dtype is not None else dit


def window_grid(config) -> jax.Array:
    """[N * substeps + 1] float32: the student sampler's N-step grid (`sample.steps`, the
    ConsistencySampler's `flow_shift`), each window cut into `distill.teacher_substeps`, then 0.
    Every substeps-th entry is a window boundary."""
    steps = int(config.sample.steps) * int(config.distill.get("teacher_substeps", 1))
    shift = float(config.sample.scheduler.get("flow_shift", 1.0))
    return jnp.asarray(np.append(consistency_times(steps, shift), 0.0), jnp.float32)


def teacher_solve(guided, x, first, fine, substeps: int, segment_ids):
    """x [B, S, D] at the per-segment grid index first [B, K] -> x after `substeps` Euler steps
    of the teacher's guided velocity `guided(x, t [B, K])` along the grid `fine`."""
    def step(x, k):
        t, t_next = fine[first + k], fine[first + k + 1]
        dt = flow.per_token(t - t_next, segment_ids)[..., None]
        return x - dt * guided(x, t), None

    return jax.lax.scan(step, x, jnp.arange(substeps))[0]


def student_rollout(student, noise, first, fine, substeps: int, segment_ids):
    """The student's own deterministic sampler from `noise` (t = 1) up to each segment's window
    start (grid index first [B, K]): x [B, S, D] as sampling would hand it to that window.
    `student(x, t [B, K])` is its velocity, without gradient."""
    windows = (len(fine) - 1) // substeps
    index = flow.per_token(first // substeps, segment_ids)[..., None]

    def step(x, j):
        t = jnp.full(first.shape, fine[j * substeps])
        dt = fine[j * substeps] - fine[(j + 1) * substeps]
        return jnp.where(j < index, x - dt * student(x, t), x), None

    return jax.lax.scan(step, noise, jnp.arange(windows - 1))[0]


def make_distill_loss(dit, text_model, config, null_ids: np.ndarray):
    """loss_fn(params, frozen, batch, rng, step) -> (loss, aux) for
    `vdit.train.step.make_train_step(..., pass_step=True)`."""
    num_segments = int(config.data.max_segments)
    cfg = config.distill
    guidance, warmup, eps = float(cfg.guidance), int(cfg.tangent_warmup), float(cfg.weight_eps)
    method, delta = cfg.get("method", "continuous"), float(cfg.get("delta", 0.05))

    jvp_dit = forward_mode_model(dit)
    fine = window_grid(config) if method == "window" else None
    windows, substeps = int(config.sample.steps), int(cfg.get("teacher_substeps", 1))
    window_start = cfg.get("window_start", "data")
    pad_to = text_pad_to(config)

    def velocity(dit_params, x_t, t_seg, batch, context, context_ids, model=dit):
        x_in = conditioning.model_input(dit, x_t, batch, jax.random.key(0), 0.0, num_segments)
        return model.apply({"params": dit_params}, x_in, batch["positions"], batch["segment_ids"],
                         t_seg * flow.NUM_TRAIN_TIMESTEPS, context, context_ids, method="packed",
                         **conditioning.micro_kwargs(dit, batch)).astype(jnp.float32)

    def loss_fn(params, frozen, batch, rng, step):
        weights = {**frozen, **params}
        student, teacher = student_and_teacher(params, frozen, config)
        context, context_ids = encode_packed_text(text_model, weights.get("text"), batch,
                                                  num_segments, pad_to)
        null = null_text(null_ids, batch["segment_ids"].shape[0], num_segments)
        null_context, null_context_ids = encode_packed_text(text_model, weights.get("text"), null,
                                                     num_segments, pad_to)
        seg, x0 = batch["segment_ids"], batch["tokens"]
        t_rng, n_rng = jax.random.split(rng)
        if method == "window":  # a window of the student's grid per segment, from its start
            first = substeps * jax.random.randint(t_rng, seg.shape[:1] + (num_segments,), 0,
                                                  windows)
            t_seg = fine[first]
        else:
            t_seg = flow.sample_segment_times(t_rng, seg, num_segments, config.flow)
        noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
        t_tok = flow.per_token(t_seg, seg)[..., None]
        x_t = flow.noisy_tokens(x0, noise, t_tok[..., 0])

        def guided(x, t):
            v_c = velocity(teacher, x, t, batch, context, context_ids)
            v_u = velocity(teacher, x, t, batch, null_context, null_context_ids)
            return jax.lax.stop_gradient(v_u + guidance * (v_c - v_u))

        def student_fn(x, t, params=student, model=dit):
            return velocity(params, x, t, batch, context, context_ids, model)

        ramp = tangent_ramp(step, warmup)
        if method == "window":
            if window_start == "student":
                x_t = student_rollout(lambda x, t: student_fn(x, t, jax.lax.stop_gradient(student)),
                                      noise, first, fine, substeps, seg)
            pred = student_fn(x_t, t_seg)
            x_end = teacher_solve(guided, x_t, first, fine, substeps, seg)
            t_end_tok = flow.per_token(fine[first + substeps], seg)[..., None]
            target = (x_t - x_end) / (t_tok - t_end_tok)
        elif method == "continuous":
            v_teacher = guided(x_t, t_seg)
            pred, dpred_dt = jax.jvp(lambda x, t: student_fn(x, t, model=jvp_dit), (x_t, t_seg),
                                     (v_teacher, jnp.ones_like(t_seg)))
            target = v_teacher - ramp * t_tok * dpred_dt
        else:  # one teacher Euler step back, the student (no gradient) there
            v_teacher = guided(x_t, t_seg)
            pred = student_fn(x_t, t_seg)
            t_prev = jnp.maximum(t_seg - delta, 0.0)
            t_prev_tok = flow.per_token(t_prev, seg)[..., None]
            x_prev = x_t - (t_tok - t_prev_tok) * v_teacher
            pred_prev = student_fn(x_prev, t_prev, jax.lax.stop_gradient(student))
            target = v_teacher + ramp * t_prev_tok / t_tok * (pred_prev - v_teacher)
        target = jax.lax.stop_gradient(target)
        mse, seg_mse = flow.packed_loss(pred, target, seg, num_segments)
        present = (flow.segment_token_counts(seg, num_segments) > 0).astype(jnp.float32)
        weight = jax.lax.stop_gradient(1.0 / (seg_mse + eps))
        weighted = jnp.sum(weight * seg_mse * present) / jnp.maximum(jnp.sum(present), 1.0)
        # value: the plain MSE (comparable across steps); gradient: the adaptively weighted one
        loss = mse + weighted - jax.lax.stop_gradient(weighted)
        # both terms average over the segments present: their count weighs accumulated batches
        return loss, {"tokens": jnp.sum(seg > 0), LOSS_WEIGHT: jnp.sum(present)}

    return loss_fn
