"""Text-to-video sampling benchmark on CPU: vdit's Generator vs diffusers' WanPipeline.

One random-weight Wan2.1-layout pipeline (default: DiT 4 layers, dim 128, VAE z 16 with Wan's
stage layout) is saved in diffusers' layout; vdit loads the folder with `Generator.from_diffusers`,
diffusers runs the torch objects. Both sample from the same noise and text embeddings (512 tokens,
classifier-free guidance, UniPC) and decode with the VAE; each number is the median wall time per
video over `--repeats` runs after one warm-up run (vdit's compile is excluded, as it happens once
per shape), for the whole video (`s_per_video`) and for sampling alone (`s_sampling_only`, latents
out). The final latents of both are compared first (`rel_err_latents_vs_diffusers`); diffusers is
timed eager and then with its transformer and VAE decoder under torch.compile (not with
--quick). Both sides run on `--threads` cores (bench/_pinning.py). Prints one JSON line per frame
count and a summary line with the ratio of whole-video seconds, vdit / diffusers eager
(target <= 0.7) and vdit / diffusers compiled.

Then a distilled student against its teacher (`vdit distill`): seconds per clip, whole video, of
the teacher's sampler (`--teacher-steps` UniPC steps with CFG: two DiT rows per clip and step)
against the student's (`--student-steps` consistency steps, guidance 1: one row per step), on the
same weights and noise; the last line is student / teacher, the sampler alone (latents out;
target <= 0.15) and the whole clip (text encoding and VAE decode included). With `--teacher RUN
--student RUN` (e.g. demo_out/runs/dit and demo_out/runs/distill) the two trained runs are timed
with their own configs' steps, guidance and clip size instead.

    .venv/bin/python bench/sample.py [--frames 17 33] [--size 64] [--steps 10] [--repeats 3]
    .venv/bin/python bench/sample.py --only-distill --teacher demo_out/runs/dit \
        --student demo_out/runs/distill
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time

from _pinning import pin_to_threads  # bench/ is the script's folder (sys.path[0])

pin_to_threads()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

from vdit.diffusion.samplers_consistency import ConsistencySampler  # noqa: E402
from vdit.pipelines.generate import Generator  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[17, 33])
    p.add_argument("--size", type=int, default=64, help="height = width in pixels")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--vae-dim", type=int, default=16, help="VAE base_dim")
    p.add_argument("--teacher-steps", type=int,
                   help="the teacher's solver steps (default: 20, or --teacher's config)")
    p.add_argument("--student-steps", type=int, default=4)
    p.add_argument("--teacher", help="a trained teacher run (with --student)")
    p.add_argument("--student", help="its distilled student run (`vdit distill`)")
    p.add_argument("--only-distill", action="store_true", help="skip the diffusers comparison")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU cores for each side (XLA's threads, torch's, the process pinned)")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run (tiny sizes, no torch.compile; the figures "
                        "mean nothing)")
    a = p.parse_args(argv)
    if a.quick:
        a.frames, a.size, a.steps, a.repeats, a.layers, a.dim, a.heads = [5], 16, 2, 1, 1, 32, 2
        a.text_dim, a.vae_dim, a.teacher_steps = 16, 8, 5
    if bool(a.teacher) != bool(a.student):
        p.error("give --teacher and --student together")
    return a


def build_pipeline(a, folder: str) -> WanPipeline:
    torch.manual_seed(0)
    dit = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=a.heads, attention_head_dim=a.dim // a.heads,
        in_channels=16, out_channels=16, text_dim=a.text_dim, freq_dim=256, ffn_dim=4 * a.dim,
        num_layers=a.layers, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024).eval()
    vae = AutoencoderKLWan(base_dim=a.vae_dim, z_dim=16, num_res_blocks=1).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                       transformer=dit)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (vdit compiles here)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_frames(a, pipe, gen, frames: int) -> dict:
    """vdit vs diffusers (eager, then its transformer and VAE decoder under torch.compile unless
    --quick) on the same noise and text: final latents compared, then seconds per video, whole
    and sampling only."""
    rng = np.random.default_rng(frames)
    latent = (a.batch, 1 + (frames - 1) // 4, a.size // 8, a.size // 8, 16)
    noise = rng.normal(size=latent).astype(np.float32)
    ctx = rng.normal(size=(a.batch, 512, a.text_dim)).astype(np.float32)
    neg = rng.normal(size=(a.batch, 512, a.text_dim)).astype(np.float32)

    def ours(output):
        return lambda: jax.block_until_ready(
            gen.text_to_video(ctx, neg, noise, a.steps, a.guidance, output))

    def theirs(output):
        def run():
            with torch.no_grad():
                return pipe(prompt_embeds=torch.from_numpy(ctx),
                            negative_prompt_embeds=torch.from_numpy(neg), height=a.size,
                            width=a.size, num_frames=frames, num_inference_steps=a.steps,
                            guidance_scale=a.guidance,
                            latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3).contiguous(),
                            output_type="pt" if output == "video" else "latent",
                            return_dict=False)[0]
        return run

    row = {"frames": frames, "size": f"{a.size}x{a.size}", "steps": a.steps, "batch": a.batch,
           "threads": a.threads}
    want = theirs("latent")().permute(0, 2, 3, 4, 1).numpy()
    got = np.asarray(ours("latent")())
    row["rel_err_latents_vs_diffusers"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    for output, key in (("video", "s_per_video"), ("latent", "s_sampling_only")):
        vdit_s = median_seconds(ours(output), a.repeats) / a.batch
        torch_s = median_seconds(theirs(output), a.repeats) / a.batch
        row |= {f"vdit_{key}": round(vdit_s, 4), f"diffusers_{key}": round(torch_s, 4),
                f"ratio_{key}": round(vdit_s / torch_s, 3)}
    if not a.quick:  # torch.compile alone takes minutes
        row |= compiled_figures(a, pipe, theirs)
    return row


def compiled_figures(a, pipe, theirs) -> dict:
    """diffusers with its transformer and VAE decoder under torch.compile (the pipeline's own
    objects swapped back afterwards): compile time and seconds per video, whole and sampling
    only (a compile failure is reported, not fatal)."""
    eager = pipe.transformer, pipe.vae.decoder
    pipe.transformer, pipe.vae.decoder = torch.compile(eager[0]), torch.compile(eager[1])
    out = {}
    try:
        start = time.perf_counter()
        theirs("video")()  # the first call compiles
        out["diffusers_compiled_compile_s"] = round(time.perf_counter() - start, 1)
        for output, key in (("video", "s_per_video"), ("latent", "s_sampling_only")):
            torch_s = median_seconds(theirs(output), a.repeats) / a.batch
            out[f"diffusers_compiled_{key}"] = round(torch_s, 4)
    except Exception as e:  # noqa: BLE001 - reported; the eager figures still stand
        out["diffusers_compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        pipe.transformer, pipe.vae.decoder = eager
    return out


def student_of(gen: Generator, steps: int) -> Generator:
    """The same weights behind a distilled student's sampler: consistency steps, no CFG."""
    return dataclasses.replace(gen, sampler=ConsistencySampler(3.0, 1.0),
                               defaults={**gen.defaults, "steps": steps, "guidance": 1.0})


def bench_distill(a, teacher: Generator, student: Generator, frames: int, size: tuple) -> dict:
    """Seconds per clip, whole video and sampling alone (latents out, no VAE decode), teacher's
    sampler vs student's, same noise and text."""
    rng = np.random.default_rng(frames)
    noise = teacher.noise(0, a.batch, frames, *size)
    ctx = rng.normal(size=(a.batch, 16, teacher.dit.text_dim)).astype(np.float32)
    neg = rng.normal(size=ctx.shape).astype(np.float32)
    row = {"bench": "distill", "frames": frames, "size": f"{size[0]}x{size[1]}"}
    for name, gen in (("teacher", teacher), ("student", student)):
        steps, guidance = int(gen.defaults["steps"]), float(gen.defaults["guidance"])
        row |= {f"{name}_steps": steps, f"{name}_guidance": guidance}
        for output, key in (("video", "s_per_clip"), ("latent", "s_sampling_only")):
            run = lambda gen=gen, s=steps, g=guidance, o=output: jax.block_until_ready(
                gen.text_to_video(ctx, neg, noise, s, g, o))
            row[f"{name}_{key}"] = round(median_seconds(run, a.repeats) / a.batch, 4)
    row["ratio"] = round(row["student_s_per_clip"] / row["teacher_s_per_clip"], 3)
    row["ratio_sampling_only"] = round(row["student_s_sampling_only"]
                                       / row["teacher_s_sampling_only"], 3)
    return row


def distill_rows(a, gen: Generator | None) -> list[dict]:
    if a.teacher:
        teacher, student = Generator.from_workdir(a.teacher), Generator.from_workdir(a.student)
        if a.teacher_steps:
            teacher = dataclasses.replace(teacher, defaults={**teacher.defaults,
                                                             "steps": a.teacher_steps})
        d = teacher.defaults
        return [bench_distill(a, teacher, student, int(d["frames"]),
                              (int(d["height"]), int(d["width"])))]
    teacher = dataclasses.replace(gen, defaults={**gen.defaults, "steps": a.teacher_steps or 20,
                                                 "guidance": a.guidance})
    return [bench_distill(a, teacher, student_of(gen, a.student_steps), f, (a.size, a.size))
            for f in a.frames]


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    print(json.dumps({"bench": "sample", "jax_devices": str(jax.devices()[0]),
                      "threads": a.threads, "torch_threads": torch.get_num_threads(),
                      "layers": a.layers, "dim": a.dim}))
    with tempfile.TemporaryDirectory() as folder:
        pipe = build_pipeline(a, folder)
        gen = Generator.from_diffusers(folder)
        rows = [] if a.only_distill else [bench_frames(a, pipe, gen, f) for f in a.frames]
        distilled = distill_rows(a, gen)
    for row in rows:
        print(json.dumps(row))
    if rows:
        total_v = sum(r["vdit_s_per_video"] for r in rows)
        summary = {"summary": "vdit/diffusers seconds per video (same weights, noise, threads)",
                   "ratio": round(total_v / sum(r["diffusers_s_per_video"] for r in rows), 3),
                   "target": 0.7}
        if all("diffusers_compiled_s_per_video" in r for r in rows):
            summary["ratio_vs_compiled"] = round(
                total_v / sum(r["diffusers_compiled_s_per_video"] for r in rows), 3)
        print(json.dumps(summary))
    for row in distilled:
        print(json.dumps(row))
    ratio = lambda key: round(sum(r[f"student_{key}"] for r in distilled)
                              / sum(r[f"teacher_{key}"] for r in distilled), 3)
    # The target is the sampler's: text encoding and the VAE decode are the same work on both
    # sides, and at the demo's 9x32x32 clips they are most of the student's whole-clip time.
    print(json.dumps({"summary": "student/teacher seconds per clip",
                      "ratio_sampling_only": ratio("s_sampling_only"), "target": 0.15,
                      "ratio_whole_clip": ratio("s_per_clip")}))


if __name__ == "__main__":
    main()
