"""The optimizer's schedule counts train steps (micro-batches) also under gradient accumulation:
k-step accumulation of a constant gradient moves the weights as a k-times shorter run without it.
Accumulation weighs each micro-batch's gradient by its loss weight and updates once per k."""

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


def test_accumulation_weighs_micro_batches_by_their_loss_weight():
    """Micro-batch gradients of means over 2 and 7 items: the update is that of their weighted
    mean (2 g1 + 7 g2) / 9, the gradient of the mean over all 9 items, not (g1 + g2) / 2."""
    cfg = recipe_module("common").optim()
    cfg.update(lr=0.1, warmup_steps=0, schedule="constant", clip_norm=0.0, weight_decay=0.0,
               grad_accum=2)
    tx = optim.make_optimizer(cfg, 10)
    plain = optim.make_optimizer(ml_collections.ConfigDict(cfg.to_dict() | dict(grad_accum=1)), 5)
    params = {"w": jnp.zeros(3)}
    g1, g2 = {"w": jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.array([-3.0, 1.0, 0.25])}
    state = tx.init(params)
    first, half = tx.update(g1, state, params, loss_weight=2.0)
    second, state = tx.update(g2, half, params, loss_weight=7.0)
    mean = {"w": (2.0 * g1["w"] + 7.0 * g2["w"]) / 9.0}
    want, _ = plain.update(mean, plain.init(params), params)
    np.testing.assert_allclose(second["w"], want["w"], rtol=1e-6)
    np.testing.assert_array_equal(first["w"], 0.0)  # half an accumulation: no update
    assert not optim.update_applied(half) and optim.update_applied(state)
    # the accumulator starts again from zero: the next pair is weighed on its own
    _, state = tx.update(g1, state, params, loss_weight=0.0)  # e.g. a micro-batch of padding
    third, _ = tx.update(g2, state, params, loss_weight=7.0)
    adam_2 = plain.update(mean, plain.init(params), params)[1]
    want2, _ = plain.update(g2, adam_2, params)
    np.testing.assert_allclose(third["w"], want2["w"], rtol=1e-6)
