"""The train state (params, EMA, optimizer state, step, rng, non-finite counters) and its shardings.

Parameters come out of `init` with logical axis names (flax `Partitioned` boxes); the shardings of
the whole state are derived from those names and the config's rule table, so that the state is
created directly sharded (jit with out_shardings) and never materialises on one device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit.parallel.mesh import logical_to_mesh_spec, undivided


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # int32 scalar: update steps attempted (skipped ones included)
    params: Any                # trainable parameters (all weights, or only LoRA adapters)
    ema: Any                   # exponential moving average of params (same tree)
    opt_state: Any
    rng: jax.Array
    bad_streak: jax.Array      # int32: consecutive non-finite steps (update skipped)
    bad_total: jax.Array       # int32: all non-finite steps so far


# The config keys behind a logical axis's size, in the DiT and in the text encoder.
_AXIS_KEYS = {
    "model": {"heads": "model.num_attention_heads", "mlp": "model.ffn_dim",
              "embed": "the width, model.num_attention_heads * model.attention_head_dim",
              "text_embed": "model.text_dim", "kv": "model.attention_head_dim"},
    "text": {"heads": "text.num_heads", "mlp": "text.d_ff", "embed": "text.d_model",
             "vocab": "text.vocab_size", "kv": "text.d_kv"}}


def check_divisible(boxed: Any, mesh: Mesh, rules) -> None:
    """Every dimension of the boxed (abstract) tree that the rules shard divides over its mesh
    axes; else a ValueError naming the parameter, the config key behind its size and the mesh
    axis (jit's own error names neither)."""
    problems = {}
    for where, size, name, axes in undivided(boxed, mesh, rules):
        part = "text" if "['text']" in where else "model"
        if (part, name, size, axes) not in problems:
            ways = math.prod(int(mesh.shape[a]) for a in axes)
            mesh_keys = " x ".join(f"config.mesh.{a}={mesh.shape[a]}" for a in axes)
            key = _AXIS_KEYS[part].get(name, f"the {part} config")
            problems[(part, name, size, axes)] = (
                f"{where} has {size} along {name!r} ({key}), split {ways} ways by {mesh_keys}")
    if problems:
        raise ValueError("the mesh does not divide the model: " + "; ".join(problems.values())
                         + ". Choose sizes that divide, or mesh axes that divide them")


def shardings_of(boxed_fn: Callable[[jax.Array], Any], mesh: Mesh, rules):
    """NamedShardings of the (boxed) tree `boxed_fn(rng)` returns, via its logical axis names."""
    boxed = jax.eval_shape(boxed_fn, jax.random.key(0))
    check_divisible(boxed, mesh, rules)
    return _named(nn.get_partition_spec(boxed), mesh, rules)


def _named(specs, mesh: Mesh, rules):
    """Logical PartitionSpecs -> NamedShardings on `mesh` under `rules`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh_spec(s, rules)), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def create_sharded(boxed_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, rules):
    """(tree, shardings): `boxed_fn(rng)` unboxed and created directly with its shardings."""
    shardings = shardings_of(boxed_fn, mesh, rules)
    # No mesh context here: flax would constrain each scanned layer's slice with the stacked
    # parameter's spec; out_shardings alone places the result.
    with nn.logical_axis_rules(rules):
        tree = jax.jit(lambda r: unbox(boxed_fn(r)), out_shardings=shardings)(rng)
    return tree, shardings


def _new_state(boxed_params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = boxed_params
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, ema=params,
                      opt_state=tx.init(params), rng=jax.random.key_data(rng),
                      bad_streak=zero, bad_total=zero)


def create_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 rng: jax.Array, mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """Initialises the state already sharded; returns (state, shardings) with plain arrays."""
    return create_sharded(lambda r: _new_state(init_fn(r), tx, r), rng, mesh, rules)


def abstract_sharded(boxed_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, rules):
    """(tree, shardings) like `create_sharded`, but the tree is `jax.ShapeDtypeStruct`s carrying
    their shardings: nothing is allocated (what a dry run compiles against)."""
    return abstract_like(jax.eval_shape(boxed_fn, rng), mesh, rules)


def abstract_like(boxed: Any, mesh: Mesh, rules):
    """`abstract_sharded` of an already abstract boxed tree (`jax.eval_shape` of a boxed init):
    one trace of the init serves both the shapes and the logical names."""
    check_divisible(boxed, mesh, rules)
    shardings = _named(nn.get_partition_spec(boxed), mesh, rules)
    boxes = lambda x: isinstance(x, nn.Partitioned)
    shapes = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if boxes(x) else x, boxed,
                          is_leaf=boxes)
    tree = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)
    return tree, shardings


def abstract_state(boxed_params: Any, tx: optax.GradientTransformation, rng: jax.Array,
                   mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """`create_state`'s (state, shardings) with an abstract state (see `abstract_sharded`), from
    abstract boxed parameters (`jax.eval_shape` of the init, so the caller traces it once)."""
    boxed = jax.eval_shape(lambda p, r: _new_state(p, tx, r), boxed_params, rng)
    return abstract_like(boxed, mesh, rules)


def unbox(tree):
    """Strips flax's `Partitioned` boxes (logical names) leaving plain arrays."""
    return nn.meta.unbox(tree)
