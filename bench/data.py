"""Data pipeline benchmark: packing efficiency against padding and bucketing, and the pipeline's
packed-token rate from latent shards on disk against the DiT train step's consumption.

(a) Padding. Clips are drawn from a mixed distribution: 6 spatial sizes (144x256, 256x144,
240x320, 256x256, 240x432, 352x640 pixels), images with probability `--image-share`, else 17, 33
or 49 frames; latent token counts for a Wan2.1-like geometry (VAE 4x time, 8x space; DiT patch
1x2x2, so 16x16 pixels per token; 144 to 11,440 tokens per clip). One line per method:
  vdit            vdit/data/pipeline.py's Grain first-fit packing (`packed_dataset`) over
                  `--batches` batches of `--rows` rows of `--tokens-per-row` tokens, `--pack-bins`
                  open bins, at most `--max-segments` clips per row; non_padding_fraction =
                  clip tokens / (batches x rows x tokens_per_row). The latents are synthetic
                  records in memory (no VAE): only their shapes matter.
  pad_to_max      the same clips, in batches of as many videos as vdit's batches held on average,
                  each video padded to the largest one of its batch.
  buckets         Open-Sora's bucket sampler: clips grouped by exact (T, H, W); a bucket's batch
                  size is the most clips that fit the same per-step budget as vdit's
                  (rows x tokens_per_row); grouping spans an epoch of `--epoch-clips` clips drawn
                  from the distribution, as Open-Sora's sampler groups a whole epoch. Open-Sora
                  runs a bucket's last, incomplete batch smaller; with static shapes (one compiled
                  program per bucket) it is padded up to the bucket's batch size, and that padding
                  is what non_padding_fraction counts. budget_fraction = clip tokens / (steps x
                  budget) says how full the steps are against the fixed budget a packed row
                  allocates; programs = distinct step shapes to compile.
  buckets_window  the same, grouping only the clips vdit packed into its batches (a bucketing
                  buffer of that size), to compare over the same clips.
(b) Throughput. Latent shards in the demo recipe's geometry (configs/shapes_dit.py:
encode.shapes/shape_weights through the shapes VAE; synthetic captions through the byte
tokenizer) are written to a temporary folder; `packed_dataset` reads them with Grain
num_workers 0 and 2 and delivers packed tokens/s (row slots, rows x tokens_per_row per batch).
The demo's jitted train step (vdit.train.loop.train on the same shards, in-process data with
prefetch) is timed over `--steps` steps: step_tokens_per_s = the same slot count / median step
time. The last line is pipeline_tokens_per_s / step_tokens_per_s (> 1: the data keeps up).
Lines of (b) carry the 1-minute load average: on a shared machine both rates scale with the CPU
share the benchmark gets.

    .venv/bin/python bench/data.py [--batches 200] [--tokens-per-row 16384] [--skip-throughput]
    .venv/bin/python bench/data.py --quick      # seconds: what tests/test_bench.py runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections import Counter

import grain
import ml_collections
import numpy as np

from vdit.data import pipeline, sources

SPATIAL = [(144, 256), (256, 144), (240, 320), (256, 256), (240, 432), (352, 640)]
DURATIONS = [17, 33, 49]
PATCH = (1, 2, 2)
VAE_TIME, VAE_SPACE = 4, 8
DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_dit.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens-per-row", type=int, default=16384)
    p.add_argument("--pack-bins", type=int, default=16)
    p.add_argument("--max-segments", type=int, default=32)
    p.add_argument("--max-text", type=int, default=64, help="caption ids per clip: 8..max-text")
    p.add_argument("--image-share", type=float, default=0.2)
    p.add_argument("--epoch-clips", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", type=int, default=2000, help="(b): latent records on disk")
    p.add_argument("--pipeline-batches", type=int, default=100)
    p.add_argument("--steps", type=int, default=5, help="(b): train steps (first 2 untimed)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run (tiny sizes and model; the figures mean nothing)")
    a = p.parse_args(argv)
    if a.quick:
        a.batches, a.epoch_clips, a.records = 2, 2000, 32
        a.pipeline_batches, a.steps = 2, 3
    return a


QUICK_MODEL = ["--config.model.num_layers=1", "--config.model.num_attention_heads=2",
               "--config.model.attention_head_dim=8", "--config.model.ffn_dim=32",
               "--config.model.text_dim=16", "--config.model.freq_dim=16",
               "--config.text.d_model=16", "--config.text.d_kv=8", "--config.text.d_ff=32",
               "--config.text.num_layers=1", "--config.text.num_heads=2",
               "--config.data.rows_per_batch=8", "--config.data.prefetch=0"]


# ------------------------------------------------------------------------------- (a) padding

def clip_shape(index: int, a) -> tuple[int, int, int]:
    """Latent (T', H', W') of clip `index` (a pure function of seed and index)."""
    rng = np.random.default_rng([a.seed, index])
    height, width = SPATIAL[rng.integers(len(SPATIAL))]
    frames = 1 if rng.random() < a.image_share else DURATIONS[rng.integers(len(DURATIONS))]
    return 1 + (frames - 1) // VAE_TIME, height // VAE_SPACE, width // VAE_SPACE


def tokens_of(shape) -> int:
    return math.prod(s // p for s, p in zip(shape, PATCH, strict=True))


class ClipShapes(grain.sources.RandomAccessDataSource):
    """Synthetic latent records of the mixed distribution: latents [T', H', W', 1] (only the
    shape matters), caption ids of 8..max_text tokens."""

    def __init__(self, a):
        self._a = a

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> dict:
        latents = np.ones((*clip_shape(index, self._a), 1), np.float32)
        text = np.ones(8 + index % (self._a.max_text - 7), np.int32)
        return {"latents": latents, "text": text}


def packing_cfg(a) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        tokens_per_row=a.tokens_per_row, text_per_row=a.max_segments * a.max_text,
        rows_per_batch=a.rows, max_segments=a.max_segments, pack_bins=a.pack_bins,
        shuffle_seed=a.seed, caption_dropout=0.0, num_workers=0, prefetch=0))


def bench_vdit(a) -> dict:
    """vdit's packing over `a.batches` batches."""
    it = iter(pipeline.packed_dataset(ClipShapes(a), packing_cfg(a), PATCH,
                                      np.array([1], np.int32), 0, 1))
    real = clips = 0
    t0 = time.perf_counter()
    for _ in range(a.batches):
        seg = next(it)["segment_ids"]
        real += int((seg > 0).sum())
        clips += sum(len(np.unique(row[row > 0])) for row in seg)
    seconds = time.perf_counter() - t0
    slots = a.batches * a.rows * a.tokens_per_row
    return {"bench": "data_padding", "method": "vdit", "non_padding_fraction": real / slots,
            "tokens_per_row": a.tokens_per_row, "rows_per_batch": a.rows,
            "pack_bins": a.pack_bins, "max_segments": a.max_segments, "batches": a.batches,
            "clips": clips, "clips_per_batch": clips / a.batches,
            "seconds": seconds, "tokens_per_s_in_memory": slots / seconds}


def bench_pad_to_max(sizes: list[int], videos_per_batch: int) -> dict:
    real = slots = 0
    for start in range(0, len(sizes) - videos_per_batch + 1, videos_per_batch):
        batch = sizes[start:start + videos_per_batch]
        real, slots = real + sum(batch), slots + len(batch) * max(batch)
    return {"bench": "data_padding", "method": "pad_to_max", "non_padding_fraction": real / slots,
            "videos_per_batch": videos_per_batch}


def bench_buckets(counts: Counter, budget: int, method: str) -> dict:
    """Bucketed batches of {(T', H', W'): clips}: batch size = clips that fit `budget`."""
    real = slots = steps = 0
    for shape, n in counts.items():
        tokens = tokens_of(shape)
        size = max(1, budget // tokens)
        batches = -(-n // size)
        real, slots, steps = real + n * tokens, slots + batches * size * tokens, steps + batches
    return {"bench": "data_padding", "method": method, "non_padding_fraction": real / slots,
            "budget_fraction": real / (steps * budget), "budget_tokens": budget,
            "programs": len(counts), "clips": sum(counts.values()), "steps": steps}


def epoch_counts(a) -> Counter:
    """Clips per (T', H', W') bucket over an epoch of `a.epoch_clips` draws."""
    rng = np.random.default_rng(a.seed + 1)
    probs = {}
    for height, width in SPATIAL:
        for frames, p in [(1, a.image_share)] + [(f, (1 - a.image_share) / len(DURATIONS))
                                                 for f in DURATIONS]:
            shape = (1 + (frames - 1) // VAE_TIME, height // VAE_SPACE, width // VAE_SPACE)
            probs[shape] = probs.get(shape, 0.0) + p / len(SPATIAL)
    draws = rng.multinomial(a.epoch_clips, list(probs.values()))
    return Counter({s: int(n) for s, n in zip(probs, draws, strict=True) if n})


def padding_lines(a) -> list[dict]:
    vdit = bench_vdit(a)
    # The baselines see as many clips as vdit packed, drawn from the same distribution (vdit's
    # packed order is grouped by fit, so it is not a fair batching order for them).
    shapes = [clip_shape(i, a) for i in range(vdit["clips"])]
    sizes = [tokens_of(s) for s in shapes]
    per_batch = max(1, round(vdit["clips_per_batch"]))
    window = Counter(shapes)
    budget = a.rows * a.tokens_per_row
    return [vdit, bench_pad_to_max(sizes, per_batch),
            {**bench_buckets(epoch_counts(a), budget, "buckets"), "scope": "epoch"},
            {**bench_buckets(window, budget, "buckets_window"), "scope": "vdit's clips"}]


# ---------------------------------------------------------------------------- (b) throughput

def demo_config(workdir: str, shards: str, extra=()):
    from vdit.config import load_config

    return load_config(DEMO_CONFIG, [
        f"--config.data.latents_dir={shards}", "--config.train.progress=False",
        "--config.train.tensorboard=False", "--config.train.steps=100000",
        "--config.checkpoint.every=100000", "--config.checkpoint.async_save=False", *extra])


def write_demo_shards(config, folder: str, count: int, num_shards: int = 4) -> float:
    """`count` latent records in the demo geometry; returns their mean token count."""
    from vdit.data.encode import sample_shape
    from vdit.data.synthetic import SyntheticShapes
    from vdit.models.text import text_encoder_from_config

    cfg, vae = config.encode, config.vae
    _, tokenizer = text_encoder_from_config(config.text)
    world = SyntheticShapes.from_config(config.data)
    rng = np.random.default_rng(0)
    records, tokens = [], []
    for i in range(count):
        frames, height, width = sample_shape(i, cfg.shapes, cfg.shape_weights, cfg.seed)
        shape = (1 + (frames - 1) // vae.scale_factor_temporal, height // vae.scale_factor_spatial,
                 width // vae.scale_factor_spatial, vae.z_dim)
        caption = world.caption(i, frames)
        ids, mask = tokenizer([caption])
        record = {"latents": rng.normal(size=shape).astype(np.float32), "caption": caption,
                  "text": ids[0][:max(1, int(mask[0].sum()))].astype(np.int32)}
        # The recipe trains image-to-video and keyframe rows (train.i2v_rate, last_frame_rate):
        # records carry their conditions [T', H', W', tf + z] as `vdit encode` writes them.
        cond = shape[:3] + (vae.scale_factor_temporal + vae.z_dim,)
        for key in ("cond_latents", "cond_latents_last"):
            record[key] = rng.normal(size=cond).astype(np.float32)
        records.append(record)
        tokens.append(tokens_of(shape[:3]))
    per = -(-count // num_shards)
    for k in range(num_shards):
        path = os.path.join(folder, sources.SHARD_PATTERN.format(index=k, count=num_shards))
        sources.write_shard(path, records[k * per:(k + 1) * per])
    return float(np.mean(tokens))


def pipeline_rate(config, workers: int, batches: int) -> dict:
    """Packed batches/s from the shards with `workers` Grain processes (0 = in-process)."""
    from vdit.models.text import text_encoder_from_config
    from vdit.train.loop import null_caption

    data = config.data.copy_and_resolve_references()
    data.num_workers = workers
    _, tokenizer = text_encoder_from_config(config.text)
    src = sources.SkippingSource(sources.LatentShardSource(data.latents_dir))
    it = iter(pipeline.packed_dataset(src, data, tuple(config.model.patch_size),
                                      null_caption(tokenizer), 0, 1))
    next(it)  # start-up (worker processes, first reads) is not the steady rate
    real, t0 = 0, time.perf_counter()
    for _ in range(batches):
        real += int((next(it)["segment_ids"] > 0).sum())
    seconds = time.perf_counter() - t0
    slots = batches * data.rows_per_batch * data.tokens_per_row
    return {"bench": "data_pipeline", "num_workers": workers, "prefetch": data.prefetch,
            "batches": batches, "tokens_per_row": data.tokens_per_row,
            "rows_per_batch": data.rows_per_batch, "pipeline_tokens_per_s": slots / seconds,
            "pipeline_clip_tokens_per_s": real / seconds, "non_padding_fraction": real / slots,
            "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count()}


def step_rate(config, workdir: str, steps: int) -> dict:
    """The demo's jitted train step, through vdit's own loop: median step time after warm-up."""
    from vdit.train import loop

    history = loop.train(config, workdir, stop_after=steps)
    times = [h["step_time"] for h in history[2:]] or [h["step_time"] for h in history]
    seconds = statistics.median(times)
    slots = config.data.rows_per_batch * config.data.tokens_per_row
    return {"bench": "dit_step", "config": "configs/shapes_dit.py", "steps": len(times),
            "step_s": seconds, "step_tokens_per_s": slots / seconds,
            "layers": config.model.num_layers,
            "dim": config.model.num_attention_heads * config.model.attention_head_dim,
            "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count()}


def throughput_lines(a) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="vdit-bench-data-") as tmp:
        shards = os.path.join(tmp, "latents")
        config = demo_config(tmp, shards, QUICK_MODEL if a.quick else ())
        mean_tokens = write_demo_shards(config, shards, a.records)
        lines = [{"bench": "data_shards", "records": a.records, "mean_clip_tokens": mean_tokens,
                  "shapes": [list(s) for s in config.encode.shapes]}]
        rates = [pipeline_rate(config, w, a.pipeline_batches) for w in (0, 2)]
        step = step_rate(config, os.path.join(tmp, "run"), a.steps)
    for r in rates:
        r["ratio_to_step"] = r["pipeline_tokens_per_s"] / step["step_tokens_per_s"]
    best = max(r["pipeline_tokens_per_s"] for r in rates)
    return lines + rates + [step, {"bench": "data_vs_step",
                                   "pipeline_tokens_per_s": best,
                                   "step_tokens_per_s": step["step_tokens_per_s"],
                                   "ratio": best / step["step_tokens_per_s"],
                                   "target": "> 1 (the pipeline keeps the step fed)"}]


def main(argv=None):
    a = parse_args(argv)
    from absl import flags

    # Grain's worker processes read absl flags; a plain script never parses them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    t0 = time.perf_counter()
    for line in padding_lines(a):
        print(json.dumps(line), flush=True)
    if not a.skip_throughput:
        for line in throughput_lines(a):
            print(json.dumps(line), flush=True)
    print(json.dumps({"bench": "data_total", "seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()
