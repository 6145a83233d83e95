"""`vdit plan`: per-device memory of a training step for a config and mesh, before launching.

    vdit plan --config configs/wan2_1_t2v_14b.py --devices 256 --rows 64 --frames 81 --size 720x1280 \
        --hbm-gb 95 --config.mesh.fsdp=-1 --config.mesh.sequence=4

Nothing real is allocated and nothing runs; the method (printed with --explain):

* parameters, EMA, optimizer state, frozen weights, batch: analytic. The train state is built
  abstractly (`jax.eval_shape` of the model's init and `tx.init`); every leaf's logical axis names
  go through the config's rule table onto the planned mesh (`config.mesh` resolved for
  `--devices`); a leaf's per-device bytes are its shard's (dims divided by the mesh axes it is
  split over, rounded up). These equal the compiled step's argument bytes.
* activations, gradients and update temporaries: XLA's `memory_analysis()` of compiled *proxies*
  (`vdit/plan/proxy.py`). A device count that does not exist here cannot be compiled, so a proxy
  keeps every per-device activation shape: the same rows per device, tokens per row, `tensor`
  and `sequence` sizes, on the local devices (data x fsdp shrunk to what fits). Attention is the
  "memory_proxy" backend (`vdit/models/attention_proxy.py`): a fused kernel's residuals, never the
  S x L logits. Loss+gradients compiled with `--proxy-layers` A,B layers (default 2,3) give the
  activation bytes, extrapolated linearly to the config's layer count (scanned blocks cost the
  same each); the whole train step compiled with B layers gives what the update adds (gradients,
  clipping, AdamW, EMA temporaries) as a multiple of the proxy's parameter bytes, applied to the
  plan's parameter bytes.

* attention FLOPs (`vdit/plan/attention.py`): a row of clips of --clip-tokens, forward and backward,
  with the block_sparse kernels' skip at each kernel's blocks, against a dense kernel.

Caveats: the proxy is compiled by this machine's backend (CPU unless run on an accelerator); CPU
upcasts some bfloat16 math and fuses differently from TPU/GPU, and fused kernels' on-chip scratch
is not counted. Treat the total as an estimate and keep headroom (XLA also reserves some memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys

import jax
import ml_collections

from vdit.config import (
    check_frames,
    check_size,
    load_config,
    require_sections,
    spatial_stride,
    text_pad_to,
)
from vdit.models.dit import build_dit
from vdit.parallel.mesh import (
    MESH_AXES,
    logical_rules,
    resolve_axis_sizes,
    split_mesh_config,
)
from vdit.plan.attention import attention_cost, format_cost
from vdit.plan.proxy import measure
from vdit.plan.weights import (
    analytic_bytes,
    text_in_step,
    training_config,
)

log = logging.getLogger(__name__)
GIB = 2 ** 30
DEFAULT_TEXT_LEN = 512  # UMT5's padded prompt length in Wan2.1


@dataclasses.dataclass
class Problem:
    """What one step processes: global rows, tokens and text tokens per row."""

    rows: int
    tokens: int
    text_len: int
    note: str = ""


@dataclasses.dataclass
class MemoryPlan:
    devices: int
    mesh: dict
    problem: Problem
    bytes: dict            # name -> per-device bytes
    counts: dict           # name -> parameter count (global)
    proxy: dict            # how the activation number was measured

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def add_plan_flags(parser: argparse.ArgumentParser) -> None:
    """The `vdit plan` flags (besides --config and --config.* overrides)."""
    parser.add_argument("--devices", type=int, help="device count to plan for (default: here)")
    parser.add_argument("--hbm-gb", dest="hbm_gb", type=float,
                        help="memory per device in GiB (e.g. 95 for TPU v5p, 80 for H100)")
    parser.add_argument("--frames", type=int, help="video frames per clip (1+4k)")
    parser.add_argument("--size", help="HEIGHTxWIDTH in pixels, e.g. 720x1280")
    parser.add_argument("--tokens", type=int, help="tokens per row (instead of --frames/--size)")
    parser.add_argument("--rows", type=int, help="global rows per step (default: config.data."
                        "rows_per_batch, else one per data x fsdp shard)")
    parser.add_argument("--text-len", dest="text_len", type=int, help="text tokens per row")
    parser.add_argument("--clip-tokens", dest="clip_tokens", type=int,
                        help="tokens per clip packed in a row, for the attention cost (default: "
                        "config.data's frames x height x width clip, else the whole row)")
    parser.add_argument("--proxy-layers", dest="proxy_layers", default="2,3",
                        help="two layer counts the proxy is compiled with, e.g. 2,3")
    parser.add_argument("--proxy-devices", dest="proxy_devices", type=int, default=8,
                        help="CPU devices the proxy compiles on (if JAX has not started yet)")
    parser.add_argument("--json", action="store_true", help="print one JSON line as well")
    parser.add_argument("--explain", action="store_true", help="print the method")


# ----------------------------------------------------------------------------- the problem


def tokens_per_row(config, frames: int, height: int, width: int) -> int:
    """Patch tokens of one clip: latent frames x (H / stride) x (W / stride) over the patch."""
    stride = spatial_stride(config)
    check_frames("--frames", frames)
    check_size("--size height", height, stride)
    check_size("--size width", width, stride)
    down = config.vae.get("temperal_downsample", None) if "vae" in config else None
    t_stride = 2 ** sum(bool(d) for d in down) if down is not None else 4
    pt = int(config.model.patch_size[0])
    latent_frames = (frames - 1) // t_stride + 1
    return -(-latent_frames // pt) * (height // stride) * (width // stride)


def problem_from_args(config, args, mesh: dict) -> Problem:
    data = config.get("data", ml_collections.ConfigDict())
    note = ""
    for flag in ("tokens", "rows", "text_len", "clip_tokens", "frames"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:  # 0 used to mean "the config's", silently
            raise ValueError(f"--{flag.replace('_', '-')} {value}: expected a count >= 1")
    if args.tokens is not None and (args.frames or args.size):
        raise ValueError("give --tokens or --frames and --size, not both")
    if args.tokens:
        tokens = int(args.tokens)
    elif args.frames or args.size:
        if not (args.frames and args.size):
            raise ValueError("give both --frames and --size HEIGHTxWIDTH (or --tokens)")
        height, width = _parse_size(args.size)
        tokens = tokens_per_row(config, args.frames, height, width)
        note = f"{args.frames} frames {height}x{width}"
    elif "tokens_per_row" in data:
        tokens = int(data.tokens_per_row)
    else:
        raise ValueError("this config has no data.tokens_per_row: give --frames and --size "
                         "(or --tokens)")
    shards = mesh["data"] * mesh["fsdp"]
    rows = int(args.rows or data.get("rows_per_batch", 0) or shards)
    if rows % shards:
        raise ValueError(f"--rows / config.data.rows_per_batch = {rows} does not divide over "
                         f"data x fsdp = {shards} devices")
    text = int(args.text_len or data.get("text_per_row", 0) or DEFAULT_TEXT_LEN)
    return Problem(rows, tokens, text, note)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError as e:
        raise ValueError(f"--size={text!r}: expected HEIGHTxWIDTH, e.g. 720x1280") from e
    return h, w


def mesh_sizes(config, devices: int) -> dict:
    """config.mesh (dcn_* folded in) resolved for `devices`: {axis: size}."""
    ici, dcn = split_mesh_config(config.get("mesh", {"data": -1}))
    dcn_total = math.prod(v for v in dcn.values() if v > 0) if dcn else 1
    if devices % dcn_total:
        raise ValueError(f"--devices={devices} is not a multiple of the dcn_* product {dcn_total}")
    sizes = resolve_axis_sizes(ici, devices // dcn_total)
    return {a: s * int(dcn.get(a, 1)) for a, s in zip(MESH_AXES, sizes)}


# ------------------------------------------------------------------------------- the plan


def batch_bytes(cfg, dit, problem: Problem, mesh: dict) -> int:
    """Per-device bytes of one packed batch (rows split over data x fsdp)."""
    rows = problem.rows // (mesh["data"] * mesh["fsdp"])
    s, length = problem.tokens, problem.text_len
    text = length * 4 if text_in_step(cfg) else length * dit.text_dim * 4
    return rows * (s * dit.token_in_dim * 4 + s * 4 * 4 + text + length * 4 * 2)


def plan_memory(config, devices: int, problem: Problem, proxy_layers=(2, 3),
                local_devices: int | None = None) -> MemoryPlan:
    """The per-device memory of a training step of `config` on `devices` devices."""
    cfg = training_config(config)
    mesh = mesh_sizes(cfg, devices)
    rules = logical_rules("dit", cfg.get("mesh", {}).get("rules", None))
    dit = build_dit(cfg.model)
    if problem.tokens % mesh["sequence"]:
        raise ValueError(f"{problem.tokens} tokens per row do not divide over config.mesh."
                         f"sequence={mesh['sequence']}")
    a, b = proxy_layers
    if not 0 < a < b:
        raise ValueError(f"--proxy-layers={a},{b}: expected two increasing positive counts")
    sizes, counts = analytic_bytes(cfg, dit, mesh, rules)
    sizes["batch"] = batch_bytes(cfg, dit, problem, mesh)
    proxy = measure(cfg, mesh, problem, rules, (a, b), local_devices or jax.device_count())
    sizes["gradients + update"] = int(proxy.update_ratio * sizes["parameters"])
    sizes["activations"] = int(proxy.activations)
    return MemoryPlan(devices, mesh, problem, sizes, counts, dataclasses.asdict(proxy))


def format_plan(plan: MemoryPlan, config_name: str, hbm_gb: float | None) -> str:
    mesh = " ".join(f"{a}={plan.mesh[a]}" for a in MESH_AXES)
    p = plan.problem
    lines = [f"vdit plan: {config_name} on {plan.devices} devices, mesh {mesh}",
             f"  step: {p.rows} rows x {p.tokens} tokens"
             + (f" ({p.note})" if p.note else "") + f", {p.text_len} text tokens per row",
             f"  parameters: {plan.counts['trainable'] / 1e9:.3f} B trainable, "
             f"{plan.counts['frozen'] / 1e9:.3f} B frozen", "  per device:"]
    for name, value in plan.bytes.items():
        lines.append(f"    {name:<24s}{_human(value):>12s}")
    lines.append(f"    {'total':<24s}{_human(plan.total):>12s}")
    proxy = plan.proxy
    temps = ", ".join(f"{n} {_human(v)}" for n, v in proxy["temp"].items())
    sizes = " ".join(f"{a}={proxy['mesh'][a]}" for a in MESH_AXES)
    lines.append(f"  proxy: mesh {sizes}, {proxy['rows']} rows; temporaries {temps}; "
                 f"{_human(proxy['per_layer'])} per layer; update "
                 f"{proxy['update_ratio']:.2f} x parameter bytes")
    if hbm_gb is not None:
        used = plan.total / (hbm_gb * GIB)
        verdict = "fits" if used <= 1.0 else "does NOT fit"
        lines.append(f"  {verdict} in {hbm_gb:g} GiB per device ({100 * used:.0f}% used)")
    return "\n".join(lines)


def _human(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def run_cli(args) -> int:
    """`vdit plan`: args.config, args.overrides and the `add_plan_flags` flags."""
    if not getattr(args, "config", None):
        raise ValueError("--config is required (a configs/*.py file)")
    proxy = _proxy_layers(args.proxy_layers)
    _ask_cpu_devices(int(getattr(args, "proxy_devices", 8) or 8))
    config = load_config(args.config, getattr(args, "overrides", []) or [])
    require_sections(config, "plan", args.config)
    devices = int(jax.device_count() if args.devices is None else args.devices)
    if devices < 1:
        raise ValueError(f"--devices={devices}: expected >= 1")
    if args.hbm_gb is not None and not args.hbm_gb > 0:
        raise ValueError(f"--hbm-gb={args.hbm_gb:g}: expected a positive size in GiB")
    problem = problem_from_args(config, args, mesh_sizes(config, devices))
    plan = plan_memory(config, devices, problem, proxy)
    if args.explain:
        print(__doc__)
    print(format_plan(plan, args.config, args.hbm_gb))
    if "distill" in config:  # said, not silent: the figures are a plain training step's
        print("  note: a distill recipe is planned as training its student; the frozen teacher "
              "(a copy of the DiT unless the student is a LoRA adapter) and the teacher's passes "
              "in the loss are not in these figures")
    cost = attention_cost(config.model, problem.rows, problem.tokens,
                          clip_tokens_of(config, args, problem), problem.text_len,
                          text_pad_to(config),
                          int(config.data.get("max_segments", 1)))
    print(format_cost(cost))
    if args.json:
        fits = None if args.hbm_gb is None else plan.total <= args.hbm_gb * GIB
        print(json.dumps({"devices": devices, "mesh": plan.mesh, "bytes": plan.bytes,
                          "total": plan.total, "fits": fits,
                          "problem": dataclasses.asdict(problem), "counts": plan.counts,
                          "attention": cost}))
    return 0


def clip_tokens_of(config, args, problem: Problem) -> int:
    """--clip-tokens, else the clip of config.data (frames, height, width), else the whole row."""
    if getattr(args, "clip_tokens", None):  # >= 1: checked with the other counts
        return int(args.clip_tokens)
    data = config.get("data", {})
    if not (args.tokens or args.frames) and all(k in data for k in ("frames", "height", "width")):
        return tokens_per_row(config, int(data.frames), int(data.height), int(data.width))
    return problem.tokens


def _proxy_layers(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in str(text).split(","))
    except ValueError as e:
        raise ValueError(f"--proxy-layers={text!r}: expected two counts like 2,3") from e
    return a, b


def _ask_cpu_devices(count: int) -> None:
    """More CPU devices for the proxy, if no JAX backend has started yet in this process."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # a backend is up already: the proxy uses the devices it has
        log.info("JAX already started: the proxy compiles on its %d devices", jax.device_count())


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m vdit.plan`); `vdit plan` calls `run_cli`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vdit plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    add_plan_flags(parser)
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = [a for a in argv if a.startswith("--config.")]
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
