"""The optimizer: AdamW with warmup + cosine/constant schedule, global-norm clipping, gradient
accumulation. Which parameters train is decided by what the train state holds (everything, or only
LoRA adapters with the base weights passed in frozen), so no mask is needed here.

Config section `optim`: lr, warmup_steps, schedule ("cosine" | "constant"), decay_steps (cosine
length after warmup; 0 = train.steps - warmup), end_lr_ratio, b1, b2, eps, weight_decay, clip_norm
(0 = off), grad_accum (micro-batches per update). Every step count (train.steps, warmup_steps,
decay_steps) counts train steps, i.e. micro-batches, with or without accumulation.

Accumulation (`accumulate`) weighs each micro-batch by the number of items its loss averages (the
`loss_weight` the step passes: segments for the flow losses), so k micro-batches update exactly as
their concatenation would, whatever clips each holds.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * end_lr_ratio` or constant."""
    warmup = int(cfg.warmup_steps)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        decay = int(cfg.decay_steps) or max(1, total_steps - warmup)
        after = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.end_lr_ratio)
    else:
        raise ValueError(f"config key 'optim.schedule' = {cfg.schedule!r}; allowed: {list(SCHEDULES)}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW, after global-norm clipping when `clip_norm` > 0, accumulated over `grad_accum`."""
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    every = int(cfg.grad_accum)
    schedule = learning_rate_schedule(cfg, total_steps)
    if every > 1:  # the accumulated optimizer counts updates; the schedule is in train steps
        schedule = _in_updates(schedule, every)
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    tx = optax.chain(*parts)
    if every > 1:
        tx = accumulate(tx, every)
    return tx


class AccumulationState(NamedTuple):
    """`accumulate`'s state: checkpointed with the train state, so a run resumes mid-update."""

    mini_step: jax.Array       # micro-batches accumulated since the last update: 0 .. every - 1
    gradient_step: jax.Array   # updates applied
    inner_opt_state: Any
    acc_grads: Any             # sum of loss_weight * gradient over those micro-batches (float32)
    acc_weight: jax.Array      # sum of their loss weights


def accumulate(inner: optax.GradientTransformation, every: int) -> optax.GradientTransformation:
    """`inner` applied once per `every` micro-batches, to their gradients averaged with the weights
    given as `update(..., loss_weight=w)` (default 1: the plain mean). A micro-batch's gradient is
    that of a mean over w items, so the weighted mean is the gradient of the mean over all the
    items: a micro-batch with fewer segments counts for less, as in the concatenated batch.
    Between updates the updates are zeros and `inner`'s state stays as it was."""
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return AccumulationState(
            mini_step=jnp.zeros([], jnp.int32), gradient_step=jnp.zeros([], jnp.int32),
            inner_opt_state=inner.init(params),
            acc_grads=jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params),
            acc_weight=jnp.zeros([], jnp.float32))

    def update(grads, state, params=None, *, loss_weight=1.0, **extra_args):
        weight = jnp.asarray(loss_weight, jnp.float32)
        acc = jax.tree.map(lambda a, g: a + weight * g.astype(jnp.float32), state.acc_grads,
                           grads)
        total = state.acc_weight + weight
        # `>=`: a run resumed mid-accumulation with a smaller grad_accum still updates.
        emit = state.mini_step >= every - 1
        zeros = jax.tree.map(jnp.zeros_like, grads)

        def final(_):  # the weighted mean through `inner`: only here, not on every micro-batch
            mean = jax.tree.map(lambda a, g: (a / total).astype(g.dtype), acc, grads)
            return inner.update(mean, state.inner_opt_state, params, **extra_args)

        def wait(_):
            return zeros, state.inner_opt_state

        # No weight at all (every micro-batch skipped as non-finite): no update, not one of zeros
        # (AdamW's momentum and decay would still move the weights).
        updates, inner_state = jax.lax.cond(emit & (total > 0), final, wait, None)
        new_state = AccumulationState(
            mini_step=jnp.where(emit, 0, state.mini_step + 1),
            gradient_step=state.gradient_step + emit.astype(jnp.int32),
            inner_opt_state=inner_state,
            acc_grads=jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), acc),
            acc_weight=jnp.where(emit, 0.0, total))
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def update_applied(opt_state) -> bool | jax.Array:
    """Whether the optimizer update that produced `opt_state` changed the parameters: always
    without accumulation (a Python True), else only when it completed an accumulation."""
    if isinstance(opt_state, AccumulationState):
        return opt_state.mini_step == 0
    return True


def _in_updates(schedule: optax.Schedule, every: int) -> optax.Schedule:
    """`schedule` over train steps, read by an optimizer that counts updates of `every` steps."""
    return lambda count: schedule(count * every)

