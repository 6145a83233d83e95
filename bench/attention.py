"""Attention over packed rows: the work the block_sparse kernels skip, counted, and timed on a TPU/GPU.

Rows are drawn by the real pipeline (`vdit/data/pipeline.py`'s `packed_dataset`, Grain first-fit
packing) from four mixes of clip shapes, as latent token counts in Wan2.1's geometry (VAE 4x time,
8x space, patch 1x2x2; 16x16 pixels per token), with captions of 8..64 text tokens:
  bench_data     bench/data.py's mix: 6 sizes 144x256..352x640, images 20%, else 17/33/49 frames;
                 rows of 16384 tokens, at most 32 clips, 16 bins.
  stage1_image   configs/stage1_image.py: encode.shapes/shape_weights, data.tokens_per_row,
  stage2_video   max_segments, pack_bins, text_per_row of that recipe (images; 33/17-frame clips
  stage3_hq      with images; 81/49-frame 480x832 clips with images).
For each mix, kernel and its blocks (`attention.block_sparse_blocks`: TPU 512x512, GPU 64x64, keys
of cross-attention 128 / 32; with `--tpu-blocks` also what TPU query/key blocks of 256 and 128
would skip, "default": false) and attention (self: tokens to tokens; cross: tokens to the packed
text), one JSON line:
  blocks_computed_over_needed  block pairs the kernel computes (`attention_blocks.computed_pairs`) /
                               block pairs holding at least one same-segment (query, key) pair
                               (exact, numpy); the issue's target is <= 1.15.
  computed_flops_over_dense    attention FLOPs computed / a dense kernel's over the row (S x L),
                               forward and backward alike (each block pair costs the same).
  needed_flops_over_dense      same-segment (query, key) pairs / S x L: what an ideal kernel does.
  computed_flops_over_needed   the two above divided: the work block granularity adds.
  aligned_*                    the layout trade, counted: were each clip (and its text) started
                               at a block boundary, the tokens added (over the clips' tokens) and
                               FLOPs computed over needed for the clips.
On a TPU or GPU (not with --quick or --skip-timing) a second kind of line times forward+backward
(jitted, bfloat16, `--heads` x `--head-dim`, median of `--iters`) per row, outputs checked close
first: block_sparse on the packed row vs the dense-masked kernel on the same row (splash on TPU,
cuDNN with its `[B, 1, S, L]` mask on GPU) vs block_sparse on each video alone (summed).

    .venv/bin/python bench/attention.py [--rows 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdit.config import recipe
from vdit.data import pipeline
from vdit.models import attention as attn
from vdit.models import attention_blocks as blocks

PATCH, VAE_TIME, VAE_SPACE = (1, 2, 2), 4, 8
BENCH_DATA_SIZES = [(144, 256), (256, 144), (240, 320), (256, 256), (240, 432), (352, 640)]
MIXES = ("bench_data", "stage1_image", "stage2_video", "stage3_hq")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64, help="packed rows drawn per mix")
    p.add_argument("--mixes", default=",".join(MIXES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", type=int, default=12, help="timing: heads (Wan2.1-1.3B: 12)")
    p.add_argument("--head-dim", dest="head_dim", type=int, default=128)
    p.add_argument("--time-rows", dest="time_rows", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--tpu-blocks", dest="tpu_blocks", default="256,128",
                   help="also count these TPU blocks (what-if lines; '' for none)")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 row per mix, no timing (seconds)")
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.skip_timing, a.tpu_blocks = 1, True, ""
    return a


def mix(name: str) -> tuple[list, list, ml_collections.ConfigDict]:
    """(pixel shapes (frames, height, width), weights, packing config) of a mix."""
    if name == "bench_data":
        shapes = [(1, h, w) for h, w in BENCH_DATA_SIZES]
        shapes += [(f, h, w) for f in (17, 33, 49) for h, w in BENCH_DATA_SIZES]
        weights = [0.2 / 6] * 6 + [0.8 / 18] * 18
        data = dict(tokens_per_row=16384, max_segments=32, pack_bins=16, text_per_row=32 * 64)
    else:
        config = recipe(name)
        shapes, weights = list(config.encode.shapes), list(config.encode.shape_weights)
        data = {k: config.data[k] for k in ("tokens_per_row", "max_segments", "pack_bins",
                                            "text_per_row")}
    cfg = ml_collections.ConfigDict(dict(data, rows_per_batch=1, shuffle_seed=0,
                                         caption_dropout=0.0, num_workers=0, prefetch=0))
    return [tuple(s) for s in shapes], weights, cfg


class Clips(grain.sources.RandomAccessDataSource):
    """Latent records of a mix: latents `[T', H', W', 1]` (only the shape matters), captions of
    8..64 tokens; a pure function of (seed, index)."""

    def __init__(self, shapes, weights, seed: int):
        self._shapes, self._p, self._seed = shapes, np.asarray(weights) / sum(weights), seed

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self._seed, index])
        frames, height, width = self._shapes[rng.choice(len(self._shapes), p=self._p)]
        latent = (1 + (frames - 1) // VAE_TIME, height // VAE_SPACE, width // VAE_SPACE)
        return {"latents": np.ones((*latent, 1), np.float32),
                "text": np.ones(int(rng.integers(8, 65)), np.int32)}


def draw_rows(name: str, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows` packed rows of a mix: (segment_ids [rows, S], text_segment_ids [rows, L])."""
    shapes, weights, cfg = mix(name)
    it = iter(pipeline.packed_dataset(Clips(shapes, weights, seed), cfg, PATCH,
                                      np.array([1], np.int32), 0, 1))
    batches = [next(it) for _ in range(rows)]
    return (np.concatenate([b["segment_ids"] for b in batches]),
            np.concatenate([b["text_segment_ids"] for b in batches]))


def count(q_ids, kv_ids, block_q: int, block_kv: int) -> dict:
    """Block and FLOP counts of one attention over rows `[R, S]` x `[R, L]`."""
    s, l_len = q_ids.shape[1], kv_ids.shape[1]
    qp = np.asarray(blocks.pad_ids(q_ids, -(-s // block_q) * block_q))
    kp = np.asarray(blocks.pad_ids(kv_ids, -(-l_len // block_kv) * block_kv))
    computed = int(np.asarray(blocks.computed_pairs(jnp.asarray(qp), jnp.asarray(kp), block_q,
                                                    block_kv)).sum())
    needed = int(blocks.needed_pairs(qp, kp, block_q, block_kv).sum())
    same = sum(same_segment_pairs(q_ids[r], kv_ids[r]) for r in range(len(q_ids)))
    dense = len(q_ids) * s * l_len
    return {"blocks_computed": computed, "blocks_needed": needed,
            "blocks_computed_over_needed": computed / needed,
            "computed_flops_over_dense": computed * block_q * block_kv / dense,
            "needed_flops_over_dense": same / dense,
            "computed_flops_over_needed": computed * block_q * block_kv / same,
            **aligned(q_ids, kv_ids, block_q, block_kv)}


def aligned(q_ids, kv_ids, block_q: int, block_kv: int) -> dict:
    """The layout trade, counted: if the pipeline started every clip (and its text) at a block
    boundary, the tokens it would add and the FLOPs computed over needed (clips' pairs only)."""
    real = extra = pairs = blocks_done = 0
    for q_row, kv_row in zip(q_ids, kv_ids, strict=True):
        for sid in np.unique(q_row[q_row > 0]):
            n, m = int(np.sum(q_row == sid)), int(np.sum(kv_row == sid))
            real += n
            extra += -(-n // block_q) * block_q - n
            pairs += n * m
            blocks_done += -(-n // block_q) * -(-m // block_kv)
    return {"aligned_extra_tokens": extra / real,
            "aligned_flops_over_needed": blocks_done * block_q * block_kv / pairs}


def same_segment_pairs(q_row, kv_row) -> int:
    """(query, key) pairs of equal id in one row: sum over ids of the two counts' product."""
    ids, q_counts = np.unique(q_row, return_counts=True)
    kv_counts = np.array([np.sum(kv_row == i) for i in ids])
    return int(np.sum(q_counts.astype(np.int64) * kv_counts))


def count_lines(name: str, seg, text, tpu_blocks=()) -> list[dict]:
    segments = float(np.mean([len(np.unique(r[r > 0])) for r in seg]))
    configs = [(kernel, None, True) for kernel in attn.BLOCK_SPARSE_BLOCKS]
    configs += [("tpu", (b, b), False) for b in tpu_blocks]
    lines = []
    for kernel, override, default in configs:
        for kind, kv in (("self", seg), ("cross", text)):
            bq, bk = attn.block_sparse_blocks(kernel, seg.shape[1], kv.shape[1], override)
            lines.append({"bench": "attention_blocks", "mix": name, "kernel": kernel,
                          "default": default, "block": [bq, bk], "attention": kind,
                          "rows": len(seg), "tokens_per_row": seg.shape[1],
                          "kv_per_row": kv.shape[1], "segments_per_row": segments,
                          **count(seg, kv, bq, bk)})
    return lines


def _timed(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rel(x, y) -> float:
    x, y = (np.asarray(t, np.float32) for t in (x, y))
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def _fwd_bwd(backend: str):
    def loss(q, k, v, ids):
        out = attn.local_attention(q, k, v, ids, ids, backend).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(jnp.arange(out.shape[1]))[None, :, None, None])
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def time_lines(name: str, seg, a) -> list[dict]:
    """Per row: block_sparse packed vs the dense-masked kernel vs each video alone (TPU/GPU)."""
    dense_backend = {"gpu": "cudnn", "tpu": "splash"}[jax.default_backend()]
    sparse, dense = _fwd_bwd("block_sparse"), _fwd_bwd(dense_backend)
    lines = []
    for r in range(min(a.time_rows, len(seg))):
        ids = jnp.asarray(seg[r:r + 1])
        rng = np.random.default_rng(r)
        q, k, v = (jnp.asarray(rng.normal(size=(1, seg.shape[1], a.heads, a.head_dim)),
                               jnp.bfloat16) for _ in range(3))
        (_, g_s), (_, g_d) = sparse(q, k, v, ids), dense(q, k, v, ids)
        err = max(_rel(x, y) for x, y in zip(g_s, g_d, strict=True))
        if not err < 2e-2:  # bfloat16 inputs
            raise RuntimeError(f"{name} row {r}: block_sparse gradients differ from "
                               f"{dense_backend}'s by {err:.3g} (relative)")
        alone = 0.0
        for sid in np.unique(seg[r][seg[r] > 0]):
            n = int(np.sum(seg[r] == sid))
            one = jnp.ones((1, n), jnp.int32)
            alone += _timed(sparse, q[:, :n], k[:, :n], v[:, :n], one, iters=a.iters)
        t_sparse = _timed(sparse, q, k, v, ids, iters=a.iters)
        t_dense = _timed(dense, q, k, v, ids, iters=a.iters)
        lines.append({"bench": "attention_time", "mix": name, "platform": jax.default_backend(),
                      "row": r, "tokens": seg.shape[1], "heads": a.heads, "head_dim": a.head_dim,
                      "block_sparse_over_dense_masked": t_sparse / t_dense,
                      "block_sparse_over_videos_alone": t_sparse / alone,
                      "dense_masked_kernel": dense_backend})
    return lines


def main(argv=None):
    a = parse_args(argv)
    timing = not a.skip_timing and jax.default_backend() in attn.BLOCK_SPARSE_BLOCKS
    for name in a.mixes.split(","):
        if name not in MIXES:
            raise SystemExit(f"unknown mix {name!r}; expected some of {MIXES}")
        seg, text = draw_rows(name, a.rows, a.seed)
        tpu_blocks = [int(b) for b in a.tpu_blocks.split(",") if b]
        lines = count_lines(name, seg, text, tpu_blocks)
        lines += time_lines(name, seg, a) if timing else []
        for line in lines:
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
