"""The distillation loss: consistency distillation of a flow-matching teacher with its
classifier-free guidance baked in (sCM / rCM's objective in the rectified-flow parameterisation,
i.e. MeanFlow with the end time fixed at 0; or its discrete, LCM-style form), on the trainer's
packed batches.

The student F(x_t, t) (the DiT, initialised from the teacher) is read as the average velocity
from t down to 0: its clean estimate f(x_t, t) = x_t - t F. Along the teacher's guided ODE
dx/dt = v_T(x, t) = v_u + w (v_c - v_u), f must stay constant (consistency); d f / dt = 0 gives
F = v_T - t dF/dt, and the student regresses on a stop-gradient target built from it:

  method "continuous": target = v_T - r t dF/dt, dF/dt = (dF/dx) v_T + dF/dt|_x from one
      `jax.jvp` through the student DiT (tangents v_T and 1; attention included);
  method "discrete": one teacher Euler step back to t' = t - delta, x' = x_t - (t - t') v_T, and
      target = v_T + r (t'/t) (F(x', t') - v_T), i.e. F such that f(x_t, t) = f(x', t'): the
      continuous target as delta -> 0, but bounded (a mix of v_T and the student's own output).

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

from vdit.diffusion import flow
from vdit.models import lora
from vdit.train import conditioning
from vdit.train.objective import encode_packed_text


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


def make_distill_loss(dit, text_model, config, null_ids: np.ndarray):
    """loss_fn(params, frozen, batch, rng, step) -> (loss, aux) for
    `vdit.train.step.make_train_step(..., pass_step=True)`."""
    num_segments = int(config.data.max_segments)
    cfg = config.distill
    guidance, warmup, eps = float(cfg.guidance), int(cfg.tangent_warmup), float(cfg.weight_eps)
    method, delta = cfg.get("method", "continuous"), float(cfg.get("delta", 0.05))

    jvp_dit = forward_mode_model(dit)

    def velocity(dit_params, x_t, t_seg, batch, context, context_ids, model=dit):
        x_in = conditioning.model_input(dit, x_t, batch, jax.random.key(0), 0.0, num_segments)
        return model.apply({"params": dit_params}, x_in, batch["positions"], batch["segment_ids"],
                         t_seg * flow.NUM_TRAIN_TIMESTEPS, context, context_ids, method="packed",
                         **conditioning.micro_kwargs(dit, batch)).astype(jnp.float32)

    def loss_fn(params, frozen, batch, rng, step):
        weights = {**frozen, **params}
        student, teacher = student_and_teacher(params, frozen, config)
        context = encode_packed_text(text_model, weights.get("text"), batch)
        null = null_text(null_ids, batch["segment_ids"].shape[0], num_segments)
        null_context = encode_packed_text(text_model, weights.get("text"), null)
        seg, x0 = batch["segment_ids"], batch["tokens"]
        t_rng, n_rng = jax.random.split(rng)
        t_seg = flow.sample_segment_times(t_rng, seg, num_segments, config.flow)
        noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
        t_tok = flow.per_token(t_seg, seg)[..., None]
        x_t = flow.noisy_tokens(x0, noise, t_tok[..., 0])

        v_c = velocity(teacher, x_t, t_seg, batch, context, batch["text_segment_ids"])
        v_u = velocity(teacher, x_t, t_seg, batch, null_context, null["text_segment_ids"])
        v_teacher = jax.lax.stop_gradient(v_u + guidance * (v_c - v_u))

        def student_fn(x, t, params=student, model=dit):
            return velocity(params, x, t, batch, context, batch["text_segment_ids"], model)

        ramp = tangent_ramp(step, warmup)
        if method == "continuous":
            pred, dpred_dt = jax.jvp(lambda x, t: student_fn(x, t, model=jvp_dit), (x_t, t_seg),
                                     (v_teacher, jnp.ones_like(t_seg)))
            target = v_teacher - ramp * t_tok * dpred_dt
        else:  # one teacher Euler step back, the student (no gradient) there
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
        return loss, {"tokens": jnp.sum(seg > 0)}

    return loss_fn
