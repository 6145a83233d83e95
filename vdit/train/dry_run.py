"""`vdit train --dry-run` (and `vdit distill --dry-run`): prove a recipe before renting a pod.

Builds what `vdit train` builds (model, mesh, the train step of `vdit.train.loop.step_setup`), but
the train state and frozen weights only as abstract shapes with their shardings (`jax.eval_shape`:
nothing allocated, no weights, tokenizer, latents or `train.init_from` run read), compiles the step
ahead of time with the real shardings, and reports one JSON line:

  params                     trainable parameters (frozen_params: the frozen ones)
  devices, mesh, backend     where it compiled (the fake CPU mesh in tests; a pod's hosts there)
  attention                  the attention backend compiled: the recipe's, or XLA's where this
                             machine lacks its kernel (splash / cudnn / block_sparse on CPU)
  tokens_per_row, rows_per_batch, text_per_row   the step's batch
  compiled_bytes_per_device  XLA's memory_analysis: arguments + outputs - donated aliases + temps,
                             plus the inputs the step does not read but the trainer holds
                             (unread_input_bytes_per_device: a two-expert run's frozen expert)
  flops_per_step             matmul FLOPs of one step over all devices (`vdit.train.flops`)
  data_overrides             the --config.data.* overrides given (e.g. rows shortened so a CPU
                             compile stays quick); empty when the recipe's own batch compiled

The bytes are this backend's: on CPU, attention is XLA's (S x S logits) where a TPU/GPU uses a
fused kernel, so compare against `--hbm-gb` on the accelerator itself or use `vdit plan`.
"""

from __future__ import annotations

import copy
import json
import math
import time

import jax

from vdit.data import pipeline
from vdit.models.attention import resolve_backend
from vdit.models.dit import build_dit
from vdit.train import preflight
from vdit.train.config_checks import check_train_config
from vdit.train.loop import compile_step, step_setup
from vdit.train.run_params import build_text_model
from vdit.train.state import abstract_sharded, abstract_state

GIB = 2 ** 30


class DoesNotFitError(ValueError):
    """The compiled step needs more memory per device than --hbm-gb allows."""


def attention_here(config):
    """(config, the attention backend compiled): the recipe's `model.attention` when this machine
    runs it, else XLA's (a pod recipe naming splash / cudnn / block_sparse dry-runs on CPU)."""
    try:
        return config, resolve_backend(config.model.attention)
    except RuntimeError:
        config = copy.deepcopy(config)
        config.model.attention = "xla"
        return config, "xla"


def dry_run(config, overrides=(), hbm_gb: float | None = None, setup_fn=step_setup) -> dict:
    """The report described in the module docstring; DoesNotFitError over `hbm_gb` GiB.

    `setup_fn` builds the step as `vdit.train.loop.step_setup` does (`vdit distill --dry-run`
    passes the distillation's)."""
    t0 = time.perf_counter()
    config, attention = attention_here(config)
    dit = build_dit(config.model)
    config = check_train_config(config, dit)
    setup = setup_fn(config, dit, build_text_model(config))
    preflight.check_batch_divides(int(config.data.rows_per_batch), setup.mesh)
    rng = jax.random.key(config.train.seed)
    state, shardings = abstract_state(jax.eval_shape(setup.trainable, rng), setup.tx, rng,
                                      setup.mesh, setup.rules)
    frozen, frozen_shardings = abstract_sharded(setup.frozen, rng, setup.mesh, setup.rules)
    compiled, flops = compile_step(setup.step_fn, state, frozen, setup.spec, shardings,
                                   frozen_shardings, setup.mesh, setup.rules)
    memory = compiled.memory_analysis()
    # Inputs the step never reads (a two-expert run's frozen expert, kept on the devices for
    # samples and the next stage) are pruned from the executable, but the trainer holds them.
    held = (_bytes_per_device(state, shardings) + _bytes_per_device(frozen, frozen_shardings)
            + _bytes_per_device(setup.spec, pipeline.batch_sharding(setup.mesh)))
    unread = max(0, held - memory.argument_size_in_bytes)
    used = (memory.argument_size_in_bytes + unread + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    report = {
        "params": count(state.params), "frozen_params": count(frozen),
        "devices": jax.device_count(), "backend": jax.default_backend(), "attention": attention,
        "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
        "tokens_per_row": int(config.data.tokens_per_row),
        "rows_per_batch": int(config.data.rows_per_batch),
        "text_per_row": int(config.data.text_per_row),
        "compiled_bytes_per_device": int(used),
        "unread_input_bytes_per_device": int(unread),
        "compiled_gib_per_device": round(used / GIB, 3),
        "flops_per_step": float(flops),
        "data_overrides": [o for o in overrides if o.lstrip("-").startswith("config.data.")],
        "compile_seconds": round(time.perf_counter() - t0, 1),
    }
    if hbm_gb is not None:
        report["hbm_gb"] = float(hbm_gb)
        report["fits"] = used <= hbm_gb * GIB
    return report


def _bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of abstract arrays `tree` laid out by `shardings`: one Sharding
    for every leaf, or a tree of them matching `tree` (None: replicated, as jit reads it)."""
    leaves, treedef = jax.tree.flatten(tree)
    layouts = ([shardings] * len(leaves) if isinstance(shardings, jax.sharding.Sharding)
               else treedef.flatten_up_to(shardings))
    return sum(math.prod(x.shape if s is None else s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(leaves, layouts, strict=True))


def run_cli(args, config, setup_fn=None) -> int:
    """`vdit train|distill --dry-run [--hbm-gb G]`: prints the report; 1 when it does not fit."""
    report = dry_run(config, args.overrides, args.hbm_gb, setup_fn or step_setup)
    print(json.dumps(report), flush=True)
    if report.get("fits") is False:
        over = report["compiled_bytes_per_device"] / GIB - args.hbm_gb
        raise DoesNotFitError(
            f"does not fit: the compiled step needs {report['compiled_gib_per_device']:.2f} GiB "
            f"per device, {over:.2f} GiB more than --hbm-gb {args.hbm_gb:g}")
    return 0
