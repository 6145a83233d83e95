"""One jitted update: loss and gradients, a skip when they are not finite, AdamW, EMA.

The step is generic over the model: it takes `loss_fn(params, frozen, batch, rng) -> (loss, aux)`.
`frozen` holds weights that do not train (the base model under LoRA, a frozen text encoder); it is
an argument, not part of the state, so it is neither optimised nor checkpointed with the state.

Under gradient accumulation (`optim.grad_accum` > 1) a step is one micro-batch: the EMA moves only
on the steps whose optimizer update changed the parameters, and `aux[LOSS_WEIGHT]` (the number of
items the loss averages; 1 when absent) weighs the micro-batch's gradient in the update
(`vdit.train.optim.accumulate`). It is the optimizer's, not a metric: the step's metrics leave it out.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from vdit.train import optim
from vdit.train.state import TrainState

LOSS_WEIGHT = "loss_weight"


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, ema_decay: float,
                    pass_step: bool = False):
    """Returns step(state, frozen, batch) -> (state, metrics); jit it with shardings outside.
    With `pass_step`, the loss also gets the update's index: loss_fn(..., rng, step) (for
    objectives with a schedule of their own, e.g. `vdit distill`'s tangent warmup)."""
    tx = optax.with_extra_args_support(tx)  # the loss weight reaches any optimizer

    def step(state: TrainState, frozen, batch) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        extra = (state.step,) if pass_step else ()
        (loss, aux), grads = grad_fn(state.params, frozen, batch, step_rng, *extra)
        aux = dict(aux)
        weight = aux.pop(LOSS_WEIGHT, 1.0)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step must leave params, moments and EMA exactly as they were (under
        # accumulation: it adds nothing to the update it belongs to).
        safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        # a skipped (non-finite) micro-batch adds nothing to an accumulation, weight included
        updates, opt_state = tx.update(safe_grads, state.opt_state, state.params,
                                       loss_weight=jnp.where(finite, weight, 0.0))
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema, params)
        applied = optim.update_applied(opt_state)
        accumulating = applied is not True
        if accumulating:  # a micro-batch short of an update: the EMA must not decay
            ema = jax.tree.map(lambda n, o: jnp.where(applied, n, o), ema, state.ema)

        def keep(new, old):
            # Under accumulation a non-finite micro-batch still counts toward the k of an
            # update (zero gradient, zero weight), so updates stay every k steps, aligned with
            # train.steps and the checkpoints; the update uses the finite micro-batches.
            if accumulating:
                return new
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            ema=keep(ema, state.ema),
            opt_state=keep(opt_state, state.opt_state),
            rng=jax.random.key_data(rng),
            bad_streak=jnp.where(finite, 0, state.bad_streak + 1),
            bad_total=state.bad_total + (~finite).astype(jnp.int32),
        )
        # The streak counters ride with the metrics: the loop reads them a step late, from the
        # outputs, instead of waiting on the (donated) state.
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "bad_streak": new_state.bad_streak, "bad_total": new_state.bad_total, **aux}
        return new_state, metrics

    return step
