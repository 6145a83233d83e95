"""DiT training-step benchmark on CPU: vdit (JAX) vs diffusers' WanTransformer3DModel (PyTorch).

Both run the same config (default: 12 layers, dim 384, 6 heads, ffn 1536, text 512, in 16) on the
same batch (default: 4 videos of 5x16x16 latents, 32 text tokens): forward + backward of an MSE
loss + one AdamW update, float32, median step time over `--steps` after `--warmup`.
FLOP/s use one analytic matmul count for both (train step = 3x forward), compared with a measured
float32 matmul peak on this machine. Prints JSON lines; the last one holds the ratio
vdit step time / torch step time (target <= 0.8).

Fairness: both sides start from the same weights (the torch model's, converted with
vdit.convert.wan_dit) and their forward outputs are compared before timing (the difference is
printed, vdit in float32 and with `--matmul-dtype`); both run on `--threads` CPU threads (XLA's and
torch's); torch's AdamW is fused; torch is timed eager and under torch.compile (a compile failure
is reported, not fatal). Each side is timed in a process of its own (the script run again with a
hidden `--side`; torch's seeded init gives every process the same weights); `--quick` times them
all in one process and skips torch.compile. vdit runs as
configs/shapes_dit.py trains, by default `--matmul-dtype bfloat16 --remat full`: bfloat16 matmul
operands with float32 sums (XLA:CPU's AMX path where the CPU has AMX) in the dense layers and
in attention's QK^T and PV, the blocks recomputed in the backward pass. Each side at its best CPU
setting: with bfloat16 operands on vdit's side, torch runs both in float32 and under
`torch.autocast("cpu", torch.bfloat16)` (its oneDNN AMX path), and the ratio line holds vdit's
time over each.

    .venv/bin/python bench/dit.py [--steps 5] [--warmup 2] [--layers 12] [--threads 2]
                                  [--matmul-dtype bfloat16] [--remat full] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _pinning import pin_to_threads  # bench/ is the script's folder (sys.path[0])

pin_to_threads()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from vdit.config import REMAT_POLICIES  # noqa: E402
from vdit.convert.wan_dit import params_from_diffusers  # noqa: E402
from vdit.models.dit import build_dit  # noqa: E402

# Each side is timed in a process of its own (this script again with --side), so neither inherits
# the other's allocator, thread pools or compiled code: (name, torch.compile, bfloat16 autocast).
TORCH_SIDES = {"torch_eager": (False, False), "torch_compiled": (True, False),
               "torch_eager_bf16_autocast": (False, True),
               "torch_compiled_bf16_autocast": (True, True)}
SIDES = ("vdit", *TORCH_SIDES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--text-dim", type=int, default=512)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--latent", type=str, default="5x16x16", help="T'xH'xW' per video")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for each side")
    p.add_argument("--remat", default="full", choices=REMAT_POLICIES,
                   help="vdit's remat policy (as config.model.remat; the demo's)")
    p.add_argument("--matmul-dtype", default="bfloat16", choices=("", "bfloat16"),
                   help="vdit's config.model.matmul_dtype (the demo's; '' = float32)")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run (tiny sizes; the figures mean nothing)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child: time one side
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.dim, a.heads, a.ffn, a.text_dim, a.videos, a.latent = 1, 32, 2, 64, 32, 2, "1x4x4"
        a.text_len, a.steps, a.warmup = 8, 2, 1
    return a


def model_config(a) -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=a.heads,
                attention_head_dim=a.dim // a.heads, in_channels=a.channels,
                out_channels=a.channels, text_dim=a.text_dim, freq_dim=256, ffn_dim=a.ffn,
                num_layers=a.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=1e-6, rope_max_seq_len=1024)


def train_flops(a, tokens: int) -> float:
    """Analytic matmul FLOPs of one train step (3x the forward pass)."""
    b, s, lt, d, f = a.videos, tokens, a.text_len, a.dim, a.ffn
    din = 4 * a.channels
    per_layer = (2 * b * s * d * 4 * d + 4 * b * s * s * d  # self-attention: q,k,v,o + core
                 + 2 * b * s * d * 2 * d + 2 * b * lt * d * 2 * d + 4 * b * s * lt * d  # cross
                 + 4 * b * s * d * f)  # FFN
    embed = 2 * b * s * d * 2 * din + 2 * b * lt * (a.text_dim * d + d * d) + 2 * b * 8 * d * d
    return 3.0 * (a.layers * per_layer + embed)


def batch(a, seed=0):
    t, h, w = (int(x) for x in a.latent.split("x"))
    rng = np.random.default_rng(seed)
    return dict(latents=rng.normal(size=(a.videos, t, h, w, a.channels)).astype(np.float32),
                target=rng.normal(size=(a.videos, t, h, w, a.channels)).astype(np.float32),
                timesteps=rng.uniform(0, 1000, size=(a.videos,)).astype(np.float32),
                context=rng.normal(size=(a.videos, a.text_len, a.text_dim)).astype(np.float32))


def timed(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_model(a):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**model_config(a)).train()


def vdit_model(a, matmul_dtype=None):
    mm = a.matmul_dtype if matmul_dtype is None else matmul_dtype
    return build_dit(dict(model_config(a), dtype="float32", matmul_dtype=mm, attention="xla",
                          remat=a.remat))


def shared_params(a, reference) -> dict:
    """The torch model's weights as vdit params (both sides train the same weights)."""
    tensors = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    return params_from_diffusers(vdit_model(a), tensors, "bench torch model")


def torch_inputs(data):
    to_ncthw = lambda k: torch.from_numpy(data[k]).permute(0, 4, 1, 2, 3).contiguous()
    return (to_ncthw("latents"), to_ncthw("target"), torch.from_numpy(data["timesteps"]),
            torch.from_numpy(data["context"]))


def output_difference(a, data, reference, params) -> dict:
    """Forward outputs of both sides on the same batch and weights, before any timing."""
    x, _, ts, ctx = torch_inputs(data)
    with torch.no_grad():
        ref = reference(x, ts, ctx, return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    inputs = tuple(jnp.asarray(data[k]) for k in ("latents", "timesteps", "context"))
    rel = lambda y: float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-12))
    ours = np.asarray(vdit_model(a, "").apply({"params": params}, *inputs))
    mixed = np.asarray(vdit_model(a).apply({"params": params}, *inputs))
    return {"bench": "dit_outputs_compared", "relative_l2_difference": rel(ours),
            "max_abs_difference": float(np.max(np.abs(ours - ref))), "close": rel(ours) < 1e-3,
            "matmul_dtype": a.matmul_dtype or "float32",
            "relative_l2_difference_with_matmul_dtype": rel(mixed)}


def bench_vdit(a, data, params) -> float:
    model = vdit_model(a)
    x, tgt, ts, ctx = (jnp.asarray(data[k]) for k in ("latents", "target", "timesteps",
                                                       "context"))
    params = jax.tree.map(jnp.asarray, params)
    opt = optax.adamw(a.lr, weight_decay=0.01)
    state = (params, opt.init(params))

    def step(state, x, tgt, ts, ctx):
        params, opt_state = state
        loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x, ts, ctx) - tgt) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    compiled = jax.jit(step, donate_argnums=0).lower(state, x, tgt, ts, ctx).compile()
    holder = [state]

    def run():
        holder[0], loss = compiled(holder[0], x, tgt, ts, ctx)
        loss.block_until_ready()

    return timed(run, a.warmup, a.steps)


def bench_torch(a, data, compiled: bool = False, bf16: bool = False) -> float:
    """Step time of the reference at its best settings: fused AdamW, optionally torch.compile,
    optionally bfloat16 autocast (float32 weights, bfloat16 matmuls, as vdit's matmul_dtype)."""
    model = torch_model(a)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, fused=True)
    x, tgt, ts, ctx = torch_inputs(data)
    forward = torch.compile(model) if compiled else model

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x, ts, ctx, return_dict=False)[0]
        torch.mean((out.float() - tgt) ** 2).backward()
        opt.step()

    return timed(run, a.warmup, a.steps)


def matmul_peak(n: int = 2048, reps: int = 5) -> dict:
    """Best float32 matmul FLOP/s seen by JAX and by torch on this machine."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    jax_t = min(_time(lambda: f(a).block_until_ready()) for _ in range(reps))
    ta = torch.ones(n, n)
    torch_t = min(_time(lambda: ta @ ta) for _ in range(reps))
    return {"jax": 2 * n**3 / jax_t, "torch": 2 * n**3 / torch_t}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_side(a, data) -> float:
    """Step seconds of one side (in a child process)."""
    if a.side == "vdit":
        return bench_vdit(a, data, shared_params(a, torch_model(a)))
    return bench_torch(a, data, *TORCH_SIDES[a.side])


def run_side(argv, side: str, a, data) -> dict:
    """Runs this script with --side in a fresh process; its last JSON line. --quick (a smoke run
    whose figures mean nothing) times the side in this process instead: five process start-ups
    (JAX, torch and diffusers imported each time) were most of its minutes."""
    if a.quick:
        try:
            return {"side": side, "step_s": time_side(argparse.Namespace(**{**vars(a),
                                                                             "side": side}), data)}
        except Exception as e:  # as in a child: torch.compile may lack a C++ toolchain
            return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--side", side],
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    data = batch(a)
    torch.set_num_threads(a.threads)
    if a.side:
        try:
            print(json.dumps({"side": a.side, "step_s": time_side(a, data)}), flush=True)
        except Exception as e:  # torch.compile needs a C++ toolchain; report, don't crash
            print(json.dumps({"side": a.side, "error": f"{type(e).__name__}: {str(e)[:300]}"}))
        return
    t, h, w = data["latents"].shape[1:4]
    tokens = t * (h // 2) * (w // 2)
    flops = train_flops(a, tokens)
    peak = matmul_peak(256 if a.quick else 2048)
    common = {"bench": "dit_train_step", "tokens_per_video": tokens, "videos": a.videos,
              "layers": a.layers, "dim": a.dim, "threads": a.threads,
              "threads_torch": torch.get_num_threads(), "flops_per_step": flops}
    print(json.dumps({"bench": "matmul_peak_f32", "flops_per_s": peak}), flush=True)
    reference = torch_model(a)
    params = shared_params(a, reference)
    print(json.dumps(output_difference(a, data, reference, params)), flush=True)
    del reference
    vdit = run_side(argv, "vdit", a, data)
    if "error" in vdit:
        raise RuntimeError(f"bench/dit.py: the vdit side failed: {vdit['error']}")
    vdit_s = vdit["step_s"]
    print(json.dumps({**common, "framework": "vdit", "matmul_dtype": a.matmul_dtype or "float32",
                      "remat": a.remat, "step_s": vdit_s,
                      "achieved_flops_per_s": flops / vdit_s,
                      "fraction_of_peak": flops / vdit_s / max(peak.values())}), flush=True)
    ratio = {"bench": "dit_train_step_ratio", "target": "<= 0.8",
             "compares": "vdit jitted step / torch step (same weights, threads, fused AdamW; "
                         + ("--quick: every side in one process)" if a.quick
                            else "each side in its own process)")}
    # --quick: no torch.compile (its compile alone is most of a smoke run's minute)
    sides = [s for s, (compiled, bf16) in TORCH_SIDES.items()
             if (a.matmul_dtype or not bf16) and not (a.quick and compiled)]
    for side in sides:
        name = side.removeprefix("torch_")
        result = run_side(argv, side, a, data)
        if "error" in result:
            print(json.dumps({**common, "framework": side, "error": result["error"]}), flush=True)
            ratio[f"vdit_over_torch_{name}"] = None
            continue
        torch_s = result["step_s"]
        print(json.dumps({**common, "framework": side, "step_s": torch_s,
                          "achieved_flops_per_s": flops / torch_s,
                          "fraction_of_peak": flops / torch_s / max(peak.values())}), flush=True)
        ratio[f"vdit_over_torch_{name}"] = vdit_s / torch_s
    done = [v for k, v in ratio.items() if k.startswith("vdit_over") and v is not None]
    ratio["vdit_over_best_torch"] = max(done) if done else None
    print(json.dumps(ratio), flush=True)


if __name__ == "__main__":
    main()
