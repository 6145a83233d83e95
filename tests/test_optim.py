"""The optimizer's schedule counts train steps (micro-batches) also under gradient accumulation:
k-step accumulation of a constant gradient moves the weights as a k-times shorter run without it."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdit.config import recipe_module
from vdit.train import optim


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_grad_accum_keeps_the_schedule_in_train_steps(schedule):
    k, steps, warmup = 4, 40, 8
    cfg = recipe_module("common").optim()
    cfg.update(lr=0.1, warmup_steps=warmup, schedule=schedule, end_lr_ratio=0.0, clip_norm=0.0)
    accumulated = optim.make_optimizer(ml_collections.ConfigDict(cfg.to_dict() | dict(
        grad_accum=k)), steps)
    plain = optim.make_optimizer(ml_collections.ConfigDict(cfg.to_dict() | dict(
        grad_accum=1, warmup_steps=warmup // k)), steps // k)
    grad = {"w": jnp.array([1.0, -2.0, 0.5])}

    def run(tx, n):
        params, trail = {"w": jnp.zeros(3)}, []
        state = tx.init(params)
        for _ in range(n):
            updates, state = tx.update(grad, state, params)
            params = {"w": params["w"] + updates["w"]}
            trail.append(np.asarray(params["w"]))
        return trail

    every_k = run(accumulated, steps)[k - 1::k]  # the weights after each update
    once = run(plain, steps // k)
    np.testing.assert_allclose(np.stack(every_k), np.stack(once), rtol=1e-5, atol=1e-7)
    if schedule == "cosine":  # the last update ran at the end of the decay, not 12% into it
        lrs = np.abs(np.diff(np.stack([np.zeros(3)] + once), axis=0))[:, 0]
        assert lrs[-1] < 0.05 * lrs.max()
