"""VAE encode/decode speed and peak memory, vdit (JAX) vs diffusers (PyTorch), one JSON line each.

Both run the same random weights (a diffusers `AutoencoderKLWan` converted to vdit) on the same
input, for each `--frames` value. Per (impl, op, frames) the line holds:
  seconds        median wall time of `--repeats` calls after one warm-up call (compile excluded;
                 `compile_seconds` reports it for vdit); `rel_err_vs_diffusers` checks the output;
  peak_bytes     vdit only: the compiled executable's `memory_analysis()`, argument + output +
                 temp bytes, i.e. what XLA plans to hold at once, params and input included;
                 `activation_bytes` is the same without the params (input + output + temp);
  rss_peak_delta_bytes  diffusers only: peak RSS growth during one call over the RSS just before
                 it (Linux VmHWM, reset via /proc/self/clear_refs), median of 3 calls after a
                 warm-up: memory the call itself needed, params and input excluded. Measured in a
                 fresh process per case (same weights, random input of the same shape) where glibc
                 is told at start to mmap every block >= 64 KiB and so give it back on free; else
                 memory freed by earlier calls hides the growth (and that setting slows calls). Not
                 reported for vdit: there it swung between 0 and 28 MB over identical calls, as
                 XLA's CPU runtime reuses memory it already holds.
`diffusers_compiled` lines time the same diffusers calls under `torch.compile` (compile time apart).
Two final lines give, per impl and op, the largest frame count's memory over the smallest's, and
vdit's seconds over diffusers' eager and compiled seconds per op and frame count.

    python bench/vae.py          # 17 and 81 frames, 32x32, base_dim 32, z_dim 4, one thread each
    python bench/vae.py --height 64 --width 96 --base-dim 16 --frames 17 33
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time

from _pinning import pin_to_threads  # bench/ is the script's folder (sys.path[0])

pin_to_threads()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402

from vdit.convert.wan_vae import params_from_torch  # noqa: E402
from vdit.models.vae_config import vae_from_config  # noqa: E402

# diffusers AutoencoderKLWan arguments per VAE layout, on top of the size flags.
LAYOUTS = {"wan2.1": {},
           "wan2.2": dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                          scale_factor_spatial=16)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=[17, 81], help="clip lengths, 1+4k")
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--base-dim", type=int, default=32)
    p.add_argument("--z-dim", type=int, default=4)
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="wan2.1",
                   help="wan2.2: residual blocks and 2x2 patching (16x spatial), z-dim 48 advised")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for each impl (1: steady figures on a shared machine)")
    p.add_argument("--rss-child", nargs=2, metavar=("OP", "FRAMES"),
                   help=argparse.SUPPRESS)  # internal: one diffusers memory measurement
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run (tiny sizes, no torch.compile; the figures mean "
                        "nothing)")
    a = p.parse_args(argv)
    if a.quick:
        a.frames, a.height, a.width, a.base_dim, a.repeats = [5], 16, 16, 8, 1
    return a


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def return_freed_memory_to_os(threshold: int = 64 * 1024) -> None:
    """A fixed mmap threshold (no dynamic growth) so freed big blocks leave the process."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    libc.mallopt(M_TRIM_THRESHOLD, threshold)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def rss_peak_delta(fn) -> int:
    """Bytes by which the process's peak RSS during `fn()` exceeds its RSS just before."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vdit_runner(vae, params, op: str, x) -> tuple:
    """(run() -> output as numpy [B, T, H, W, C], facts from compiling it)."""
    start = time.perf_counter()
    compiled = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=op)).lower(
        params, x).compile()
    compile_seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    parts = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
             "temp": mem.temp_size_in_bytes}
    param_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    # XLA drops unused arguments (the encoder's params when decoding): count the params it kept
    kept_params = min(param_bytes, parts["argument"] - x.nbytes)
    facts = dict(compile_seconds=compile_seconds, peak_bytes=sum(parts.values()),
                 activation_bytes=sum(parts.values()) - kept_params, memory_analysis=parts)
    first = (lambda out: out[0]) if op == "encode" else (lambda out: out)
    return lambda: np.asarray(first(jax.block_until_ready(compiled(params, x)))), facts


def diffusers_runner(ref, op: str, x: torch.Tensor, compiled: bool = False):
    """run() -> diffusers' output as numpy [B, T, H, W, C]; `compiled`: its encoder and decoder
    under torch.compile (diffusers calls them once per chunk of frames with a feature cache, so
    compiling them, not the Python chunk loop, gives graphs that do not grow with the clip)."""
    if compiled:
        ref = copy.copy(ref)  # same weights; its own module table, so `ref` itself stays eager
        ref._modules = dict(ref._modules)
        ref.encoder, ref.decoder = torch.compile(ref.encoder), torch.compile(ref.decoder)

    def run():
        with torch.no_grad():
            out = ref.encode(x).latent_dist.mean if op == "encode" else ref.decode(x).sample
        return out.permute(0, 2, 3, 4, 1).numpy()
    return run


def build_models(args):
    torch.manual_seed(args.seed)
    layout = dict(LAYOUTS[args.layout])
    if args.layout != "wan2.1":  # diffusers' default statistics have Wan2.1's 16 channels
        layout.update(latents_mean=[0.0] * args.z_dim, latents_std=[1.0] * args.z_dim)
    ref = AutoencoderKLWan(base_dim=args.base_dim, z_dim=args.z_dim,
                           num_res_blocks=args.num_res_blocks, **layout).eval()
    vae = vae_from_config(dict(ref.config))
    params = params_from_torch(vae, {k: v.numpy() for k, v in ref.state_dict().items()}, "bench")
    return ref, vae, jax.device_put(params)


def time_all(args) -> list[dict]:
    """Per frame count, op and impl: seconds (and vdit's compile facts), same input for both."""
    ref, vae, params = build_models(args)
    rng = np.random.default_rng(args.seed)
    rows = []
    for frames in args.frames:
        video = rng.uniform(-1, 1, (1, frames, args.height, args.width, 3)).astype(np.float32)
        video_t = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()
        latents = diffusers_runner(ref, "encode", video_t)()
        latents_t = torch.from_numpy(latents).permute(0, 4, 1, 2, 3).contiguous()
        for op, x, x_t in (("encode", video, video_t), ("decode", latents, latents_t)):
            run_ref = diffusers_runner(ref, op, x_t)
            run_vdit, facts = vdit_runner(vae, params, op, jax.device_put(x))
            want = run_ref()
            err = float(np.linalg.norm(run_vdit() - want) / np.linalg.norm(want))
            common = dict(bench="vae", layout=args.layout, op=op, frames=frames, height=args.height,
                          width=args.width, base_dim=args.base_dim, threads=args.threads)
            rows.append(dict(common, impl="vdit", backend=jax.default_backend(),
                             seconds=median_seconds(run_vdit, args.repeats), **facts,
                             rel_err_vs_diffusers=err))
            rows.append(dict(common, impl="diffusers",
                             seconds=median_seconds(run_ref, args.repeats)))
            if not args.quick:  # torch.compile alone takes ~45 s even at --quick's sizes
                rows.append(dict(common, **compiled_timing(ref, op, x_t, want, args.repeats)))
    return rows


def compiled_timing(ref, op: str, x_t: torch.Tensor, want: np.ndarray, repeats: int) -> dict:
    """diffusers under torch.compile: seconds after a warm-up, compile time and output error
    (a compile failure, e.g. no C++ toolchain, is reported in the line, not fatal)."""
    row = dict(impl="diffusers_compiled")
    try:
        run = diffusers_runner(ref, op, x_t, compiled=True)
        start = time.perf_counter()
        got = run()  # the first call compiles
        row["compile_seconds"] = time.perf_counter() - start
        row["rel_err_vs_diffusers"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        row["seconds"] = median_seconds(run, repeats)
    except Exception as e:  # noqa: BLE001 - reported, the eager figures still stand
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def diffusers_rss(args, op: str, frames: int) -> float:
    """In a fresh process: RSS growth of one diffusers call (median of 3, after a warm-up)."""
    return_freed_memory_to_os()
    ref, vae, _ = build_models(args)
    latent_frames = 1 + (frames - 1) // 4
    f = vae.spatial_factor
    shape = ((1, 3, frames, args.height, args.width) if op == "encode" else
             (1, args.z_dim, latent_frames, args.height // f, args.width // f))
    run = diffusers_runner(ref, op, torch.randn(shape))
    run()
    return statistics.median(rss_peak_delta(run) for _ in range(3))


def rss_in_child(args, op: str, frames: int) -> float:
    flags = ["--height", args.height, "--width", args.width, "--base-dim", args.base_dim,
             "--z-dim", args.z_dim, "--num-res-blocks", args.num_res_blocks, "--seed", args.seed,
             "--layout", args.layout,
             "--threads", args.threads, "--rss-child", op, frames]
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, flags)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["rss_peak_delta_bytes"]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        value = diffusers_rss(args, args.rss_child[0], int(args.rss_child[1]))
        print(json.dumps({"rss_peak_delta_bytes": value}))
        return
    rows = time_all(args)
    for row in rows:
        if row["impl"] == "diffusers":
            row["rss_peak_delta_bytes"] = rss_in_child(args, row["op"], row["frames"])
        print(json.dumps(row), flush=True)
    print(json.dumps(summary(rows, min(args.frames), max(args.frames))), flush=True)
    print(json.dumps(speed_ratios(rows)), flush=True)


def summary(rows, lo: int, hi: int) -> dict:
    """Memory at the longest clip over memory at the shortest, per impl, op and measure."""
    by_key = {(r["impl"], r["op"], r["frames"]): r for r in rows}
    out = dict(bench="vae", summary=f"memory at {hi} frames / at {lo} frames")
    for impl, op in [(i, o) for i in ("vdit", "diffusers") for o in ("encode", "decode")]:
        for key in ("peak_bytes", "activation_bytes", "rss_peak_delta_bytes"):
            if key in by_key[(impl, op, lo)]:
                small, big = by_key[(impl, op, lo)][key], by_key[(impl, op, hi)][key]
                out[f"{impl}_{op}_{key}"] = round(big / small, 3) if small else None
    return out


def speed_ratios(rows) -> dict:
    """vdit seconds over diffusers' eager and torch.compile seconds, per op and frame count."""
    seconds = {(r["impl"], r["op"], r["frames"]): r.get("seconds") for r in rows}
    out = dict(bench="vae", summary="vdit seconds / diffusers seconds (same weights, input, threads)")
    for (impl, op, frames), vdit_s in seconds.items():
        if impl != "vdit":
            continue
        for ref, name in (("diffusers", "eager"), ("diffusers_compiled", "compiled")):
            ref_s = seconds.get((ref, op, frames))
            out[f"{op}_{frames}f_vdit_over_{name}"] = round(vdit_s / ref_s, 3) if ref_s else None
    return out


if __name__ == "__main__":
    main()
