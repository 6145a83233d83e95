"""`make distill` (after `make demo`): the demo's DiT distilled into a 4-step student, judged
against it on the same held-out prompts.

1. distills OUT/runs/dit into OUT/runs/distill (configs/shapes_distill.py; resumes if stopped),
2. samples the same held-out prompts, seeds and batches as `make demo` into OUT/distill_samples/
   and OUT/distill_samples.jsonl (the format of OUT/samples.jsonl),
3. prints the judge's table, teacher (OUT/samples.jsonl; sampled into OUT/distill_teacher_samples/
   when that is missing or holds another count) vs student, and each one's sampling seconds per
   clip (median of `--repeats` warm batches); writes OUT/distill_judge.json.
Extra `--config.KEY=VALUE` arguments override the student's config. `--quick` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import jax
import ml_collections
import numpy as np

from vdit.config import load_config
from vdit.distill.setup import distill
from vdit.eval.shapes import eval_shapes_dir, format_table
from vdit.eval.shapes_samples import HELD_OUT_SAMPLES, sample_prompts, write_samples
from vdit.pipelines.generate import Generator
from vdit.train.init_from import run_weights

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "shapes_distill.py")
QUICK = ["--config.train.steps=20", "--config.distill.tangent_warmup=10"]
BATCH = 8  # as `make demo` samples: the same prompts, noise and batches


def seconds_per_clip(gen, config, repeats: int) -> tuple[float, float]:
    """Median wall time per clip of one warm batch of BATCH held-out prompts: (the whole clip:
    text, sampler and VAE decode; the sampler alone, latents out: what distillation shortens)."""
    prompts = [r["prompt"] for r in sample_prompts(config, BATCH)]
    frames, height, width = (int(config.sample[k]) for k in ("frames", "height", "width"))
    noise = gen.noise(0, BATCH, frames, height, width)
    context, mask = gen.encode_text(prompts)
    negative, negative_mask = gen.encode_text([""] * BATCH)
    runs = (lambda: gen.generate(prompts, frames, height, width, seed=0),
            lambda: gen.text_to_video(context, negative, noise, output="latent",
                                      context_mask=mask, negative_mask=negative_mask))
    medians = []
    for run in runs:
        jax.block_until_ready(run())  # compiles
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times) / BATCH)
    return medians[0], medians[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    parser.add_argument("--samples", type=int, default=None,
                        help="held-out prompts (default: as many as OUT/samples.jsonl, else "
                        f"{HELD_OUT_SAMPLES})")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches per model")
    args, overrides = parser.parse_known_args(argv)
    bad = [a for a in overrides if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)

    out = os.path.abspath(args.out)
    teacher, student = os.path.join(out, "runs", "dit"), os.path.join(out, "runs", "distill")
    if not os.path.isdir(os.path.join(teacher, "checkpoints")):
        raise SystemExit(f"make distill: no teacher run in {teacher}: run `make demo` first")
    config = load_config(CONFIG, (QUICK if args.quick else []) + overrides
                         + [f"--config.distill.teacher={teacher}"])
    t0 = time.time()
    print(f"[1/3] distilling {teacher} for {config.train.steps} steps -> {student}")
    history = distill(config, student)
    if history:
        print(f"      final loss {history[-1]['loss']:.4f} ({time.time() - t0:.0f}s)")

    teacher_file = os.path.join(out, "samples.jsonl")
    teacher_count = _lines(teacher_file)
    count = args.samples or teacher_count or HELD_OUT_SAMPLES
    print(f"[2/3] sampling {count} held-out prompts with the student -> {out}/distill_samples")
    gen, run_config = load(student)
    student_file = write_samples(gen, run_config, out, count, BATCH, "distill_samples")
    teacher_gen, teacher_config = load(teacher)
    if teacher_count != count:  # judged on the student's prompts and noise; demo's kept
        teacher_file = write_samples(teacher_gen, teacher_config, out, count, BATCH,
                                     "distill_teacher_samples")
    print(f"      done ({time.time() - t0:.0f}s)")

    print("[3/3] judging teacher vs student (color / shape / direction of the main object):")
    result = {}
    for name, file, model in (("teacher", teacher_file, teacher_gen), ("student", student_file, gen)):
        scores = eval_shapes_dir(None, file)["scores"]
        clip, sampler = seconds_per_clip(model, run_config, args.repeats)
        result[name] = {"scores": scores, "s_per_clip": round(clip, 4),
                        "s_per_clip_sampling": round(sampler, 4),
                        "steps": int(model.defaults["steps"]),
                        "guidance": float(model.defaults["guidance"])}
        print(f"{name}: {result[name]['steps']} steps, guidance {result[name]['guidance']}, "
              f"{clip:.3f} s per clip ({sampler:.3f} s sampling, latents out)")
        print(format_table(scores))
    ratio = {k: round(result["student"][k] / max(result["teacher"][k], 1e-9), 4)
             for k in ("s_per_clip", "s_per_clip_sampling")}
    diffs = {k: round(result["student"]["scores"][k] - result["teacher"]["scores"][k], 4)
             for k in ("color", "shape", "direction")}
    result |= {"time_ratio": ratio["s_per_clip"], "sampling_time_ratio": ratio["s_per_clip_sampling"],
               "score_diff": diffs, "distill_seconds": round(time.time() - t0, 1)}
    with open(os.path.join(out, "distill_judge.json"), "w") as f:
        json.dump(result, f, indent=2, default=_plain)
    print(f"student/teacher seconds per clip {ratio['s_per_clip']:.3f} (sampling alone "
          f"{ratio['s_per_clip_sampling']:.3f}); score differences {diffs}; "
          f"make distill finished in {time.time() - t0:.0f}s")
    return 0


def load(workdir: str):
    """(Generator, saved config) of a run, from its EMA weights."""
    params, saved = run_weights(workdir, "ema")
    config = ml_collections.ConfigDict(saved)
    return Generator.from_params(config, params, workdir), config


def _lines(path: str) -> int:
    """Non-blank lines of a jsonl file; 0 when it is missing."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    sys.exit(main())
