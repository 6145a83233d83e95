"""Low-rank adapters (LoRA) on the DiT's dense kernels, as a separate parameter tree.

The DiT module is untouched: adapters live in their own tree and are merged into a copy of the
base parameters wherever the DiT is applied (inside the training loss, once for sampling/export):

    merged_kernel = base_kernel + (A @ B) * alpha / rank

A kernel is `[*layers, *in, *out]`: leading axes named "layers" (the `nn.scan` stack), then the
input axes the Dense contracts, then its output axes. Inputs are one axis, except a kernel that
starts with ("heads", "kv") (attention's `to_out`, which contracts all heads). Its adapter is
`{"a": [*layers, *in, rank], "b": [*layers, rank, *out]}`, stored at the kernel's own path
(`adapters["blocks"]["attn1"]["to_q"]["kernel"] = {"a", "b"}`). A and B carry the kernel's
logical axis names on their layer/in/out axes (so they shard like the kernel: embed over fsdp,
heads/mlp over tensor); the rank axis is replicated. A starts Gaussian with std 1/sqrt(fan_in),
B at zero, so a fresh adapter leaves the model exactly as it was.

Config section `lora`: enabled, rank, alpha, targets (regexes, `re.search`ed against
"/"-joined parameter paths such as "blocks/attn1/to_q/kernel"; only parameters named "kernel"
with at least 2 axes besides "layers" are candidates). Defaults: `lora()` in configs/common.py.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

log = logging.getLogger(__name__)
# Leading kernel axes that a Dense contracts together (everything else contracts one axis).
MULTI_AXIS_INPUTS = (("heads", "kv"),)
LETTERS = "abcdefghijklmnopqstuvwxyz"  # einsum letters, "r" kept for the rank
# adapter tree -> the DiT it adapts: a Wan2.2 two-expert run has one per expert (vdit/train/experts.py)
ADAPTED = {"lora": "dit", "lora_2": "dit_2"}


def enabled(config) -> bool:
    """Whether `config` (a whole run config) trains LoRA adapters."""
    return "lora" in config and bool(config.lora.get("enabled", False))


def check_config(config) -> None:
    """Start-up checks of `config.lora` for a run that enables it; errors name the key."""
    if not enabled(config):
        return
    cfg = config.lora
    rank = cfg.get("rank", None)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"config key 'lora.rank' = {rank!r}: expected a positive int")
    alpha = cfg.get("alpha", None)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"config key 'lora.alpha' = {alpha!r}: expected a positive number")
    compile_targets(cfg.get("targets", None))
    if "text" in config and config.text.get("trainable", False):
        log.warning("LoRA trains only the adapters: the text encoder stays frozen although "
                    "text.trainable=True")
    if not config.train.get("init_from", ""):
        raise ValueError("config key 'lora.enabled' = True needs 'train.init_from': the vdit run "
                         "(workdir or checkpoint step folder) whose DiT the adapters finetune, "
                         "e.g. --config.train.init_from=runs/dit")


def compile_targets(targets) -> list[re.Pattern]:
    if isinstance(targets, str) or not targets:
        raise ValueError(f"config key 'lora.targets' = {targets!r}: expected a non-empty list of "
                         "regexes over parameter paths, e.g. ['blocks/attn1/to_(q|k|v|out)/kernel$']")
    out = []
    for pattern in targets:
        try:
            out.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"config key 'lora.targets': {pattern!r} is not a valid regex ({e})") from e
    return out


def scale(cfg) -> float:
    return float(cfg.alpha) / int(cfg.rank)


def path_name(path: tuple[str, ...]) -> str:
    return "/".join(str(p) for p in path)


def kernel_layout(shape: tuple[int, ...], names) -> tuple[int, int]:
    """(number of leading layer axes, number of input axes) of a kernel from its logical names."""
    names = tuple(names) if names is not None else (None,) * len(shape)
    n_layers = 0
    while n_layers < len(names) and names[n_layers] == "layers":
        n_layers += 1
    rest = names[n_layers:]
    n_in = next((len(g) for g in MULTI_AXIS_INPUTS if rest[:len(g)] == g), 1)
    return n_layers, n_in


def _boxed_kernels(boxed_params) -> dict[tuple, nn.Partitioned]:
    flat = traverse_util.flatten_dict(boxed_params)  # a Partitioned box is a leaf
    return {k: v for k, v in flat.items() if k[-1] == "kernel"}


def select_targets(boxed_params, cfg) -> dict[tuple, nn.Partitioned]:
    """The kernels of the (boxed) DiT tree that `cfg.targets` match; every pattern must match."""
    patterns = compile_targets(cfg.targets)
    kernels = _boxed_kernels(boxed_params)
    chosen = {}
    for pattern in patterns:
        hits = {k: v for k, v in kernels.items() if pattern.search(path_name(k))}
        if not hits:
            sample = sorted(path_name(k) for k in kernels)[:12]
            raise ValueError(f"config key 'lora.targets': {pattern.pattern!r} matches no DiT "
                             f"kernel; kernel paths look like {sample}")
        chosen.update(hits)
    for key, leaf in chosen.items():
        if not isinstance(leaf, nn.Partitioned):  # the layer/in/out split comes from the names
            raise ValueError(f"lora target {path_name(key)!r} has no logical axis names: pass the "
                             "boxed parameters that the DiT's init returns")
        n_layers, n_in = kernel_layout(_value(leaf).shape, _names(leaf))
        if _value(leaf).ndim - n_layers - n_in < 1:
            raise ValueError(f"lora target {path_name(key)!r} has shape {_value(leaf).shape}: "
                             "not a dense kernel [*layers, *in, *out]")
    return chosen


def _value(leaf):
    return leaf.value if isinstance(leaf, nn.Partitioned) else leaf


def _names(leaf):
    return leaf.names if isinstance(leaf, nn.Partitioned) else None


def init_adapters(rng: jax.Array, boxed_params, cfg) -> dict:
    """Boxed adapters {"a", "b"} for every targeted kernel of the boxed DiT tree (see module doc)."""
    rank = int(cfg.rank)
    flat = {}
    for i, (key, leaf) in enumerate(sorted(select_targets(boxed_params, cfg).items())):
        shape, names = _value(leaf).shape, tuple(_names(leaf))
        n_layers, n_in = kernel_layout(shape, names)
        lead, ins, outs = shape[:n_layers + n_in], shape[n_layers:n_layers + n_in], shape[n_layers + n_in:]
        fan_in = math.prod(ins)
        a = jax.random.normal(jax.random.fold_in(rng, i), lead + (rank,), jnp.float32)
        b = jnp.zeros(shape[:n_layers] + (rank,) + outs, jnp.float32)
        flat[key + ("a",)] = nn.Partitioned(a / math.sqrt(fan_in), names[:n_layers + n_in] + (None,))
        flat[key + ("b",)] = nn.Partitioned(b, names[:n_layers] + (None,) + names[n_layers + n_in:])
    return traverse_util.unflatten_dict(flat)


def lora_delta(a: jax.Array, b: jax.Array, kernel_ndim: int, scale_: float) -> jax.Array:
    """(A @ B) * scale with the kernel's shape: a [*L, *in, r], b [*L, r, *out]."""
    n_layers = a.ndim + b.ndim - 2 - kernel_ndim
    n_in, n_out = a.ndim - 1 - n_layers, b.ndim - 1 - n_layers
    if n_layers < 0 or n_in < 1 or n_out < 1:
        raise ValueError(f"adapter shapes a {a.shape}, b {b.shape} do not fit a kernel of "
                         f"{kernel_ndim} axes")
    letters = iter(LETTERS)
    lay = "".join(next(letters) for _ in range(n_layers))
    ins = "".join(next(letters) for _ in range(n_in))
    outs = "".join(next(letters) for _ in range(n_out))
    return jnp.einsum(f"{lay}{ins}r,{lay}r{outs}->{lay}{ins}{outs}", a, b) * scale_


def merge_lora(base_params, adapters, lora_config) -> dict:
    """Base DiT params with every adapter merged into its kernel; other leaves are the same
    arrays. Errors name the adapter path whose kernel is missing or has another shape."""
    flat = traverse_util.flatten_dict(base_params)
    factors = traverse_util.flatten_dict(adapters)
    s = scale(lora_config)
    for key in sorted({k[:-1] for k in factors}):
        if key not in flat:
            raise ValueError(f"LoRA adapter {path_name(key)!r} has no kernel in the base DiT "
                             "parameters (different model, or targets changed)")
        a, b, kernel = factors[key + ("a",)], factors[key + ("b",)], flat[key]
        delta = lora_delta(a, b, kernel.ndim, s)
        if delta.shape != kernel.shape:
            raise ValueError(f"LoRA adapter {path_name(key)!r} gives shape {delta.shape} but the "
                             f"base kernel is {kernel.shape}")
        flat[key] = kernel + delta.astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def merge_all(weights: dict, lora_config) -> dict:
    """`weights` with every adapter tree ("lora", "lora_2") merged into its DiT and removed."""
    weights = dict(weights)
    for name, dit in ADAPTED.items():
        if name in weights:
            weights[dit] = merge_lora(weights[dit], weights.pop(name), lora_config)
    return weights


def wrap_loss(loss_fn: Callable, config) -> Callable:
    """loss_fn(params, frozen, batch, rng) that, under LoRA, merges params["lora"] (and
    "lora_2") into the frozen base DiT ("dit_2") before calling `loss_fn`; unchanged when LoRA
    is off."""
    if not enabled(config):
        return loss_fn
    cfg = config.lora

    def with_adapters(params, frozen, batch, rng):
        adapters = {k: v for k, v in params.items() if k in ADAPTED}
        params = {k: v for k, v in params.items() if k not in ADAPTED}
        frozen = merge_all({**frozen, **adapters}, cfg)
        return loss_fn(params, frozen, batch, rng)

    return with_adapters


def check_resume(saved: dict, config) -> None:
    """A LoRA workdir resumes only with the same adapters."""
    before = saved.get("lora", {}) or {}
    now = config.lora.to_dict() if "lora" in config else {}
    if not (before.get("enabled") or now.get("enabled")):
        return
    changed = [f"lora.{k}: checkpoint {before.get(k)!r} -> now {now.get(k)!r}"
               for k in sorted(set(before) | set(now))
               if _norm(before.get(k)) != _norm(now.get(k))]
    if changed:  # the base (train.init_from) is checked for every run, vdit/train/init_from.py
        raise ValueError("cannot resume this LoRA run with different adapter settings ("
                         + "; ".join(changed) + "); use a new --workdir or undo the change")


def _norm(value):
    return list(value) if isinstance(value, tuple) else value
