"""The compiled proxies behind `vdit plan`'s measured numbers (method in `vdit/plan/__init__.py`).

Functions of the trainer are lowered from abstract shapes and compiled, never run, for a model
with a few layers, on a mesh of local devices that keeps the planned mesh's per-device activation
shapes; `memory_analysis()` gives their temporary bytes:

  grad(A), grad(B)  loss and gradients (`make_dit_loss` under `value_and_grad`) with A and B
                    layers: activations, extrapolated linearly in the number of scanned layers;
  step(B)           the whole train step (`make_train_step`: clip, AdamW, EMA, skip-if-non-finite,
                    donated state). step(B) - grad(B) is what the update adds (gradients and
                    update temporaries); it scales with the parameter shard, so it is kept as a
                    ratio to the proxy's per-device parameter bytes and applied to the plan's.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import ml_collections

from vdit.data.pipeline import batch_sharding
from vdit.models import lora
from vdit.models.dit import build_dit
from vdit.parallel.mesh import make_mesh
from vdit.plan.weights import per_device_bytes, text_in_step, weights_fn
from vdit.train import experts, optim, run_params
from vdit.train.loop import batch_spec
from vdit.train.state import abstract_like, abstract_state, check_divisible
from vdit.train.step import make_train_step

# The proxy is compiled, never run: skip the CPU code generator's expensive optimisations (about
# 3x faster; buffer assignment, hence memory_analysis, happens before them and is unchanged).
_FAST_CODEGEN = {"cpu": {"xla_backend_optimization_level": 0,
                         "xla_llvm_disable_expensive_passes": True}}


@dataclasses.dataclass
class ProxyResult:
    mesh: dict              # the proxy mesh sizes
    rows: int               # global rows of the proxy batch
    temp: dict              # "grad@A", "grad@B", "step@B" -> temporary bytes per device
    per_layer: float        # activation bytes per extra layer
    activations: float      # extrapolated to the config's layer count
    update_ratio: float     # (step - grad) / proxy parameter bytes per device


def proxy_mesh_sizes(mesh: dict, local_devices: int) -> dict:
    """Same tensor and sequence sizes; data x fsdp shrunk to the devices left."""
    t, s = mesh["tensor"], mesh["sequence"]
    if t * s > local_devices:
        raise ValueError(f"tensor x sequence = {t * s} devices per shard, but only "
                         f"{local_devices} devices are here to compile the proxy on: pass "
                         f"--proxy-devices N (N >= tensor x sequence = {t * s}; CPU devices), "
                         "or run plan where more exist")
    room = local_devices // (t * s)
    fsdp = min(mesh["fsdp"], room)
    data = min(mesh["data"], room // fsdp)
    return {"data": data, "fsdp": fsdp, "tensor": t, "sequence": s}


def abstract_batch(cfg, dit, rows: int, tokens: int, text_len: int, text_ids: bool) -> dict:
    """The trainer's batch (`loop.batch_spec`: I2V condition tokens, CLIP image tokens, micro
    values as the config has them) at the plan's rows x tokens and text length."""
    sized = ml_collections.ConfigDict(cfg.to_dict())
    sized.data.update(dict(rows_per_batch=rows, tokens_per_row=tokens, text_per_row=text_len))
    return batch_spec(sized, dit, None if text_ids else dit.text_dim)


def compile_proxy(cfg, layers: int, sizes: dict, rows: int, problem, rules,
                  full_step: bool) -> tuple[int, int]:
    """(temporary bytes per device, proxy parameter bytes per device) of one proxy compile."""
    model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
    model_cfg.num_layers, model_cfg.attention = layers, "memory_proxy"
    dit = build_dit(model_cfg)
    key = jax.random.key(0)
    # One abstract init serves the shapes, the logical names and the bytes of every tree below.
    trainable, frozen = jax.eval_shape(weights_fn(cfg, dit), key)
    mesh = make_mesh(sizes, devices=jax.devices()[:math.prod(sizes.values())])
    text_ids = text_in_step(cfg)
    batch = abstract_batch(cfg, dit, rows, problem.tokens, problem.text_len, text_ids)
    text_model = run_params.build_text_model(cfg) if text_ids else None
    loss_fn = lora.wrap_loss(experts.make_loss(dit, text_model, cfg), cfg)  # the trainer's loss
    # Both trees in one check (their keys are disjoint), DiT first: one error lists every part
    # the mesh does not divide, not just the first tree's.
    check_divisible({**trainable, **frozen}, mesh, rules)
    # The trainer's abstract state and frozen weights, with its shardings (vdit/train/state.py).
    fixed, fixed_sh = abstract_like(frozen, mesh, rules)
    if full_step:
        tx = optim.make_optimizer(cfg.optim, int(cfg.train.steps))
        state, state_sh = abstract_state(trainable, tx, key, mesh, rules)
        jitted = jax.jit(make_train_step(loss_fn, tx, float(cfg.train.ema_decay)),
                         in_shardings=(state_sh, fixed_sh, batch_sharding(mesh)),
                         out_shardings=(state_sh, None), donate_argnums=(0,))
        args = (state, fixed, batch)
    else:
        params, params_sh = abstract_like(trainable, mesh, rules)
        jitted = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                         in_shardings=(params_sh, fixed_sh, batch_sharding(mesh), None))
        args = (params, fixed, batch, key)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jitted.lower(*args)
    stats = lowered.compile(compiler_options=_FAST_CODEGEN.get(jax.default_backend())
                            ).memory_analysis()
    if stats is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory_analysis(); "
                           "vdit plan needs one (CPU, TPU and GPU do)")
    return int(stats.temp_size_in_bytes), per_device_bytes(trainable, sizes, rules)


def measure(cfg, mesh: dict, problem, rules, proxy_layers: tuple[int, int],
            local_devices: int) -> ProxyResult:
    """The three proxy compiles (module doc), extrapolated to `cfg.model.num_layers`."""
    sizes = proxy_mesh_sizes(mesh, local_devices)
    rows = problem.rows // (mesh["data"] * mesh["fsdp"]) * sizes["data"] * sizes["fsdp"]
    a, b = proxy_layers
    run = lambda layers, full: compile_proxy(cfg, layers, sizes, rows, problem, rules, full)
    grad_a, _ = run(a, False)
    grad_b, _ = run(b, False)
    step_b, params_b = run(b, True)
    per_layer = max(0.0, (grad_b - grad_a) / (b - a))
    activations = grad_a + per_layer * (int(cfg.model.num_layers) - a)
    temp = {f"grad@{a}": grad_a, f"grad@{b}": grad_b, f"step@{b}": step_b}
    ratio = max(0.0, (step_b - grad_b) / max(params_b, 1))
    return ProxyResult(sizes, rows, temp, per_layer, activations, ratio)
