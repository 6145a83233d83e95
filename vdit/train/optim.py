"""The optimizer: AdamW with warmup + cosine/constant schedule, global-norm clipping, gradient
accumulation. Which parameters train is decided by what the train state holds (everything, or only
LoRA adapters with the base weights passed in frozen), so no mask is needed here.

Config section `optim`: lr, warmup_steps, schedule ("cosine" | "constant"), decay_steps (cosine
length after warmup; 0 = train.steps - warmup), end_lr_ratio, b1, b2, eps, weight_decay, clip_norm
(0 = off), grad_accum (micro-batches per update). Every step count (train.steps, warmup_steps,
decay_steps) counts train steps, i.e. micro-batches, with or without accumulation.
"""

from __future__ import annotations

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
    if every > 1:  # MultiSteps' inner count is updates; the schedule is in train steps
        schedule = _in_updates(schedule, every)
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    tx = optax.chain(*parts)
    if every > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=every)
    return tx


def _in_updates(schedule: optax.Schedule, every: int) -> optax.Schedule:
    """`schedule` over train steps, read by an optimizer that counts updates of `every` steps."""
    return lambda count: schedule(count * every)

