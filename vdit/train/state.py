"""The train state (params, EMA, optimizer state, step, rng, non-finite counters) and its shardings.

Parameters come out of `init` with logical axis names (flax `Partitioned` boxes); the shardings of
the whole state are derived from those names and the config's rule table, so that the state is
created directly sharded (jit with out_shardings) and never materialises on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # int32 scalar: update steps attempted (skipped ones included)
    params: Any                # trainable parameters (all weights, or only LoRA adapters)
    ema: Any                   # exponential moving average of params (same tree)
    opt_state: Any
    rng: jax.Array
    bad_streak: jax.Array      # int32: consecutive non-finite steps (update skipped)
    bad_total: jax.Array       # int32: all non-finite steps so far


def state_shardings(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                    mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract state, its NamedShardings) for params produced by `init_fn(rng)`."""
    def make(rng):
        return _new_state(init_fn(rng), tx, rng)

    abstract = jax.eval_shape(make, jax.random.key(0))
    specs = nn.get_partition_spec(abstract)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    shardings = _apply_rules(shardings, mesh, rules)
    return abstract, shardings


def _apply_rules(shardings, mesh: Mesh, rules):
    """Logical PartitionSpecs -> mesh PartitionSpecs using the rule table."""
    def convert(s: NamedSharding):
        return NamedSharding(mesh, nn.logical_to_mesh_axes(s.spec, rules))
    return jax.tree.map(convert, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def _new_state(boxed_params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = boxed_params
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, ema=params,
                      opt_state=tx.init(params), rng=jax.random.key_data(rng),
                      bad_streak=zero, bad_total=zero)


def create_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 rng: jax.Array, mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """Initialises the state already sharded; returns (state, shardings) with plain arrays."""
    _, shardings = state_shardings(init_fn, tx, mesh, rules)

    def make(r):
        return unbox(_new_state(init_fn(r), tx, r))

    with mesh, nn.logical_axis_rules(rules):
        state = jax.jit(make, out_shardings=shardings)(rng)
    return state, shardings


def unbox(tree):
    """Strips flax's `Partitioned` boxes (logical names) leaving plain arrays."""
    return nn.meta.unbox(tree)
