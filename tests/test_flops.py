"""FLOP counting on jaxprs (vdit/train/flops.py), which the trainer's MFU divides by: matmuls,
gradients, grouped convolutions, scans times their length, and the DiT train step's per-layer
FLOPs equal to the analytic matmul count (XLA's cost_analysis counts the scanned blocks once)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from train_testing import tiny_config

from vdit.train import loop, optim, run_params
from vdit.train.flops import jaxpr_flops
from vdit.train.objective import make_dit_loss
from vdit.train.state import TrainState, unbox
from vdit.train.step import make_train_step


def test_matmul_grad_conv_and_scan_counts():
    trace = lambda f, *args: jax.jit(f).trace(*args).jaxpr
    assert jaxpr_flops(trace(lambda a, b: a @ b, jnp.ones((3, 5)), jnp.ones((5, 7)))) == 2 * 3 * 5 * 7
    scan = lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=3)[0]
    assert jaxpr_flops(trace(scan, jnp.ones((4, 4)))) == 3 * 2 * 4**3
    # d/dw only: the forward matmul and one for the weight gradient.
    grad = jax.grad(lambda w, x: jnp.sum((x @ w) ** 2))
    assert jaxpr_flops(trace(grad, jnp.ones((8, 16)), jnp.ones((32, 8)))) == 2 * (2 * 32 * 8 * 16)
    conv = nn.Conv(6, (3, 3), feature_group_count=2)
    params = conv.init(jax.random.key(0), jnp.ones((1, 10, 10, 4)))
    x = jnp.ones((2, 10, 10, 4))
    assert jaxpr_flops(trace(conv.apply, params, x)) == 2 * (2 * 10 * 10 * 6) * (3 * 3 * 2)
    branches = lambda p, a: jax.lax.cond(p, lambda: a @ a, lambda: a)
    assert jaxpr_flops(trace(branches, True, jnp.ones((4, 4)))) == 2 * 4**3


def _step_flops(layers: int):
    # remat "none": the formula below is the model's matmuls; a remat policy adds the forward
    # matmuls its backward recomputes (counted as hardware FLOPs, see vdit/train/flops.py).
    config = tiny_config("shapes_dit", "unused", f"--config.model.num_layers={layers}",
                         "--config.model.remat=none")
    dit, text_model, _ = run_params.build_models(config)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    params = jax.eval_shape(lambda r: unbox(run_params.init_params(dit, text_model, config, r)),
                            jax.random.key(0))
    trainable, frozen = run_params.split_trainable(config, params)
    zero = jnp.zeros((), jnp.int32)
    state = jax.eval_shape(lambda p: TrainState(
        step=zero, params=p, ema=p, opt_state=tx.init(p),
        rng=jax.random.key_data(jax.random.key(0)), bad_streak=zero, bad_total=zero), trainable)
    step = make_train_step(make_dit_loss(dit, text_model, config), tx, 0.9)
    spec = loop.batch_spec(config, dit, None)
    return jaxpr_flops(jax.jit(step).trace(state, frozen, spec).jaxpr), config


def test_dit_step_counts_every_scanned_layer():
    layers = 3
    one, config = _step_flops(1)
    many, _ = _step_flops(layers)
    r, s, length = (config.data[k] for k in ("rows_per_batch", "tokens_per_row", "text_per_row"))
    d, f = config.model.num_attention_heads * config.model.attention_head_dim, config.model.ffn_dim
    forward = (4 * 2 * r * s * d * d + 4 * r * s * s * d          # self-attention: q k v o + core
               + 2 * 2 * r * s * d * d + 2 * 2 * r * length * d * d  # cross: q o, k v on text
               + 4 * r * s * length * d + 2 * 2 * r * s * d * f)   # cross core, FFN
    assert (many - one) / (layers - 1) == 3 * forward  # forward + two backward matmuls each
