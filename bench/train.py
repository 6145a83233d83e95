"""Train-step benchmark: steady-state tokens/s and MFU of vdit's DiT train step, and packing
against padding measured on the step itself. Prints JSON lines.

The step is built as `vdit.train.loop.train` builds it (same models, optimizer, loss, shardings,
ahead-of-time compile by `loop.compile_step`). FLOPs per step are `loop.compile_step`'s, as the
trainer's MFU metric uses them: matmul FLOPs counted on the step's jaxpr (vdit/train/flops.py).
XLA's `compiled.cost_analysis()` FLOPs are printed beside them (`xla_cost_flops_per_step`,
`mfu_xla_cost`): they count the nn.scan'd DiT blocks once, not num_layers times. MFU divides by a
peak: `--peak-flops` if given, else the best float32 matmul (`--matmul` square, JAX) measured here.
Step times are medians over `--steps` steps after `--warmup`, batches prepared beforehand (data
loading is not timed). One CPU device; on a shared machine all rates scale with the CPU share.

  demo       configs/shapes_dit.py as it is in the repo: packed batches (its data section) of
             random latents in the shapes of its `encode.shapes`/`shape_weights` through its VAE
             geometry, the synthetic world's captions as ids of the recipe's tokenizer (the text
             encoder runs in the step, trained or frozen as the recipe says), I2V condition
             latents when the recipe trains image-to-video.
  dit12x384  bench/dit.py's model (12 layers, dim 384, 6 heads, ffn 1536, text_dim 512, 16
             latent channels) on bench/dit.py's batch: 4 rows, one 5x16x16-latent video each
             (320 tokens), 32 text tokens given as embeddings (no text encoder).
  packing    the demo model on the clips of its timed packed batches, laid out three ways:
             packed (the demo's rows, as timed above); dense_padded, the clip stream cut into
             batches of as many videos as a packed batch held on average, every video padded to
             its batch's largest (T', H', W') box, one video per row (padding masked out), text
             padded to the longest caption; packed_text_fit, the packed rows with the text budget
             (data.text_per_row) cut to the longest packed text row. useful_tokens_per_s counts
             clip tokens only; the last line holds the ratios to dense_padded.

    .venv/bin/python bench/train.py [--steps 4] [--warmup 1] [--layers-b 12] [--skip-b]
                                    [--set model.remat=none ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import load_config
from vdit.data import conditions, pipeline
from vdit.data.encode import sample_shape
from vdit.models import lora, patches
from vdit.parallel.mesh import logical_rules, mesh_from_config
from vdit.train import conditioning, loop, optim, run_params
from vdit.train.objective import make_dit_loss
from vdit.train.state import create_sharded, create_state
from vdit.train.step import make_train_step

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "shapes_dit.py")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers-b", type=int, default=12, help="layers of the dit12x384 model")
    p.add_argument("--skip-b", action="store_true", help="skip the dit12x384 model")
    p.add_argument("--skip-demo", action="store_true", help="skip the demo model and packing")
    p.add_argument("--peak-flops", type=float, default=0.0, help="FLOP/s per device; 0: measure")
    p.add_argument("--matmul", type=int, default=2048)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of the demo recipe (e.g. model.remat=none), repeatable")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run (tiny sizes; the figures mean nothing)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.skip_b, a.matmul = 2, 1, True, 256
    return a


# --quick: a one-layer demo model, so the smoke run compiles in seconds
QUICK_DEMO = ["--config.model.num_layers=1", "--config.model.num_attention_heads=2",
              "--config.model.attention_head_dim=8", "--config.model.ffn_dim=32",
              "--config.text.num_layers=1"]


def demo_config(extra=()):
    return load_config(DEMO, ["--config.train.progress=False", "--config.data.prefetch=0",
                              "--config.mesh.data=1", *extra])


def dit12x384_config(layers: int):
    return load_config(DEMO, [
        "--config.model.num_attention_heads=6", "--config.model.attention_head_dim=64",
        "--config.model.ffn_dim=1536", "--config.model.text_dim=512",
        "--config.model.freq_dim=256", f"--config.model.num_layers={layers}",
        "--config.model.in_channels=16", "--config.model.out_channels=16",
        "--config.text.trainable=False", "--config.data.text_format='embeddings'",
        "--config.train.i2v_rate=0.0",
        "--config.data.rows_per_batch=4", "--config.data.tokens_per_row=320",
        "--config.data.text_per_row=32", "--config.data.max_segments=1",
        "--config.data.prefetch=0", "--config.train.progress=False", "--config.mesh.data=1"])


@dataclasses.dataclass
class Built:
    """One model's trainer pieces as `loop.train` builds them; a step compiles per batch shape."""
    step_fn: object
    state: object
    shardings: object
    frozen: object
    frozen_shardings: object
    mesh: object
    rules: tuple
    dit: object
    tokenizer: object

    def compile(self, config):
        """(compiled step for `config.data`'s batch shape, its FLOPs, a fresh copy of the
        state: the step donates the one it is given)."""
        text_dim = None if config.data.text_format == "ids" else self.dit.text_dim
        spec = loop.batch_spec(config, self.dit, text_dim)
        compiled, flops = loop.compile_step(self.step_fn, self.state, self.frozen, spec,
                                            self.shardings, self.frozen_shardings, self.mesh,
                                            self.rules)
        return compiled, flops, jax.tree.map(jnp.copy, self.state)


def build(config) -> Built:
    mesh = mesh_from_config(config.mesh)
    rules = logical_rules("dit", config.mesh.get("rules", None))
    dit, text_model, tokenizer = run_params.build_models(config)
    boxed = lambda rng: run_params.init_params(dit, text_model, config, rng)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    rng = jax.random.key(config.train.seed)
    state, shardings = create_state(lambda r: run_params.split_trainable(config, boxed(r))[0], tx, rng,
                                    mesh, rules)
    frozen, frozen_shardings = create_sharded(lambda r: run_params.split_trainable(config, boxed(r))[1],
                                              rng, mesh, rules)
    loss_fn = lora.wrap_loss(make_dit_loss(dit, text_model, config), config)
    step_fn = make_train_step(loss_fn, tx, config.train.ema_decay)
    return Built(step_fn, state, shardings, frozen, frozen_shardings, mesh, rules, dit, tokenizer)


def xla_cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def time_steps(compiled, state, frozen, batches, mesh, warmup: int) -> tuple[list[float], object]:
    """Seconds of each step after `warmup` (the state is donated and threaded through)."""
    times = []
    for i, batch in enumerate(batches):
        batch = pipeline.to_global(batch, mesh)
        t0 = time.perf_counter()
        state, out = compiled(state, frozen, batch)
        jax.block_until_ready(out)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, state


def demo_records(config, dit, tokenizer, count: int, seed: int = 0) -> list[dict]:
    """Random latents in the demo's encode shapes (VAE geometry from config.vae) with the
    synthetic world's captions, plus random I2V condition latents and micro-conditioning values
    when the model takes them: what `vdit encode` would write, without running the VAE."""
    from vdit.data.synthetic import SyntheticShapes

    world = SyntheticShapes.from_config(config.data)
    tf = 2 ** sum(bool(d) for d in config.vae.temperal_downsample)
    sf = 2 ** (len(config.vae.dim_mult) - 1)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        frames, height, width = sample_shape(i, config.encode.shapes, config.encode.shape_weights,
                                             config.encode.seed)
        shape = (1 + (frames - 1) // tf, height // sf, width // sf, config.vae.z_dim)
        caption = world.caption(i, frames)
        ids, mask = tokenizer([caption])
        record = {"latents": rng.normal(size=shape).astype(np.float32),
                  "text": np.asarray(ids[0][: int(mask[0].sum())], np.int32), "caption": caption,
                  "meta": {name: 1.0 for name in dit.micro_conditioning}}
        if conditioning.uses_condition(config, dit):
            for key in (conditions.COND_KEY, conditions.COND_KEY_LAST):
                record[key] = rng.normal(size=shape[:3] + (tf + shape[3],)).astype(np.float32)
        records.append(record)
    return records


def packed_batches(config, dit, tokenizer, records, count: int) -> list[dict]:
    """`count` packed batches as `loop.train` draws them."""
    ds = pipeline.packed_dataset(
        records, config.data, dit.patch_size, loop.null_caption(tokenizer), process_index=0,
        process_count=1, condition=conditioning.uses_condition(config, dit),
        micro=dit.micro_conditioning, last_frame_rate=float(config.train.get("last_frame_rate", 0)))
    it = iter(ds)
    return [next(it) for _ in range(count)]


TOKEN_KEYS = ("tokens", "positions", conditions.COND_TOKENS)  # [rows, S, ...] per-token arrays
TEXT_KEYS = ("text", "text_positions")


def segments(batch: dict) -> list[dict]:
    """The clips of a packed batch: per-token arrays [N, ...], text [L], micro values each."""
    out = []
    micro = [k for k in batch if k.startswith(conditions.MICRO_PREFIX)]
    for r in range(batch["segment_ids"].shape[0]):
        seg, tseg = batch["segment_ids"][r], batch["text_segment_ids"][r]
        for k in range(1, int(seg.max()) + 1):
            clip = {key: batch[key][r][seg == k] for key in TOKEN_KEYS if key in batch}
            clip |= {key: batch[key][r][tseg == k] for key in TEXT_KEYS}
            clip |= {key: batch[key][r, k - 1] for key in micro}
            out.append(clip)
    return out


def dense_batch(clips: list[dict], text_len: int, max_segments: int) -> dict:
    """One video per row, padded to the batch's largest (T', H', W') box in patches."""
    box = np.max([c["positions"].max(0) + 1 for c in clips], axis=0)
    s, rows = int(np.prod(box)), len(clips)
    batch = {"segment_ids": np.zeros((rows, s), np.int32),
             "text_segment_ids": np.zeros((rows, text_len), np.int32)}
    for key, value in clips[0].items():
        if key in TOKEN_KEYS:
            batch[key] = np.zeros((rows, s) + value.shape[1:], value.dtype)
        elif key in TEXT_KEYS:
            batch[key] = np.zeros((rows, text_len), value.dtype)
        else:  # micro value: column 0 is segment 1's
            batch[key] = np.zeros((rows, max_segments), np.float32)
    for r, c in enumerate(clips):
        n, m = len(c["tokens"]), len(c["text"])
        for key, value in c.items():
            if key in TOKEN_KEYS:
                batch[key][r, :n] = value
            elif key in TEXT_KEYS:
                batch[key][r, :m] = value
            else:
                batch[key][r, 0] = value
        batch["segment_ids"][r, :n] = 1
        batch["text_segment_ids"][r, :m] = 1
    return batch


def matmul_peak(n: int, reps: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def report(name, flops, times, tokens, useful, peak, **extra) -> dict:
    step = statistics.median(times)
    line = {"bench": "train_step", "config": name, "step_s": step, "tokens_per_step": tokens,
            "useful_tokens_per_step": useful, "tokens_per_s": tokens / step,
            "useful_tokens_per_s": useful / step, "flops_per_step": flops,
            "achieved_flops_per_s": flops / step, "mfu": flops / step / peak, **extra}
    print(json.dumps(line), flush=True)
    return line


def bench_model(name, config, peak, args, batches_fn) -> tuple[list[dict], list[float], float,
                                                               Built]:
    """Reports one model's steady-state line; returns (batches, timed step seconds, FLOPs, the
    built model)."""
    t0 = time.perf_counter()
    built = build(config)
    compiled, flops, state = built.compile(config)
    compile_s = time.perf_counter() - t0
    dit = built.dit
    batches = batches_fn(config, dit, built.tokenizer, args.warmup + args.steps)
    times, _ = time_steps(compiled, state, built.frozen, batches, built.mesh, args.warmup)
    useful = float(np.mean([np.sum(b["segment_ids"] > 0) for b in batches[args.warmup:]]))
    tokens = int(batches[0]["segment_ids"].size)
    xla = xla_cost_flops(compiled)
    report(name, flops, times, tokens, useful, peak, layers=dit.num_layers,
           dim=dit.num_attention_heads * dit.attention_head_dim, remat=dit.remat,
           build_compile_s=compile_s,
           xla_cost_flops_per_step=xla, mfu_xla_cost=xla / statistics.median(times) / peak)
    return batches, times, flops, built


def b_batches(config, dit, tokenizer, count: int) -> list[dict]:
    """bench/dit.py's batch: 4 rows, one 5x16x16x16-latent video each, 32 text embeddings."""
    rng = np.random.default_rng(0)
    rows, length = config.data.rows_per_batch, config.data.text_per_row
    out = []
    for _ in range(count):
        lat = rng.normal(size=(rows, 5, 16, 16, config.model.in_channels)).astype(np.float32)
        tokens = patches.patchify_batch(lat, dit.patch_size)
        n = tokens.shape[1]
        out.append({"tokens": np.asarray(tokens),
                    "positions": np.broadcast_to(patches.grid_positions((5, 8, 8)), (rows, n, 3)),
                    "segment_ids": np.ones((rows, n), np.int32),
                    "text": rng.normal(size=(rows, length, dit.text_dim)).astype(np.float32),
                    "text_segment_ids": np.ones((rows, length), np.int32),
                    "text_positions": np.broadcast_to(np.arange(length), (rows, length))})
    return out


def time_layout(built: Built, config, batches, args) -> dict:
    """Seconds, useful tokens and FLOPs over `batches`, one warmed-up compiled step per shape
    (each from the built model's initial state)."""
    programs, out = {}, {"seconds": 0.0, "useful": 0, "flops": 0.0, "steps": len(batches)}
    frozen, mesh = built.frozen, built.mesh
    for batch in batches:
        key = (*batch["tokens"].shape[:2], batch["text"].shape[1])
        if key not in programs:
            cfg = config.copy_and_resolve_references()
            cfg.data.rows_per_batch, cfg.data.tokens_per_row, cfg.data.text_per_row = key
            compiled, flops, state = built.compile(cfg)
            _, state = time_steps(compiled, state, frozen, [batch] * args.warmup, mesh, 0)
            programs[key] = [compiled, state, flops]
        compiled, state, flops = programs[key]
        t, programs[key][1] = time_steps(compiled, state, frozen, [batch], mesh, 0)
        out["seconds"] += t[0]
        out["useful"] += int(np.sum(batch["segment_ids"] > 0))
        out["flops"] += flops
    out["shapes"] = [list(k) for k in sorted(programs)]
    return out


def layout_line(layout: str, result: dict, batches: list[dict], videos_per_batch: float) -> dict:
    slots = sum(b["segment_ids"].size for b in batches)
    text = sum(int(np.sum(b["text_segment_ids"] > 0)) for b in batches)
    line = {"bench": "packing", "layout": layout,
            "useful_tokens_per_s": result["useful"] / result["seconds"],
            "non_padding_fraction": result["useful"] / slots,
            "text_non_padding_fraction": text / sum(b["text"].size for b in batches),
            "flops_per_useful_token": result["flops"] / result["useful"],
            "videos_per_batch": videos_per_batch, "steps": result["steps"],
            "shapes_rows_tokens_text": result["shapes"]}
    print(json.dumps(line), flush=True)
    return line


def bench_packing(built: Built, config, batches, times, flops, args) -> None:
    """The clips of the demo's timed packed `batches` (`times`, `flops` per step) re-laid out
    dense-padded, and packed with the text budget cut to what the rows use."""
    timed = batches[args.warmup:]
    clips = [c for b in timed for c in segments(b)]
    per_video = len(clips) / len(timed)
    packed = {"seconds": sum(times), "useful": sum(int(np.sum(b["segment_ids"] > 0)) for b in timed),
              "flops": flops * len(timed), "steps": len(timed),
              "shapes": [[*timed[0]["tokens"].shape[:2], timed[0]["text"].shape[1]]]}
    packed = layout_line("packed", packed, timed, per_video)

    per_batch = max(1, round(per_video))
    text_len = max(len(c["text"]) for c in clips)
    dense_batches = [dense_batch(clips[i:i + per_batch], text_len, config.data.max_segments)
                     for i in range(0, len(clips) - per_batch + 1, per_batch)]
    dense = layout_line("dense_padded", time_layout(built, config, dense_batches, args), dense_batches,
                        per_batch)

    used = max(int(np.max(np.nonzero(b["text_segment_ids"].any(0))[0])) + 1 for b in timed)
    fit_batches = [dict(b, **{k: b[k][:, :used] for k in ("text", "text_segment_ids",
                                                          "text_positions")}) for b in timed]
    fit = layout_line("packed_text_fit", time_layout(built, config, fit_batches, args), fit_batches,
                      per_video)
    print(json.dumps({"bench": "packing_ratio",
                      "packed_over_dense": packed["useful_tokens_per_s"]
                      / dense["useful_tokens_per_s"],
                      "packed_text_fit_over_dense": fit["useful_tokens_per_s"]
                      / dense["useful_tokens_per_s"],
                      "text_per_row": int(config.data.text_per_row), "text_used": used}),
          flush=True)


def main(argv=None):
    args = parse_args(argv)
    peak = args.peak_flops or matmul_peak(args.matmul)
    print(json.dumps({"bench": "peak_flops_per_device", "flops_per_s": peak,
                      "source": "--peak-flops" if args.peak_flops else
                      f"measured: best {args.matmul}^2 float32 matmul (JAX)",
                      "devices": jax.device_count(), "cpus": os.cpu_count(),
                      "load_1min": os.getloadavg()[0]}), flush=True)
    if not args.skip_demo:
        demo = demo_config([*(QUICK_DEMO if args.quick else ()),
                            *(f"--config.{kv}" for kv in args.set)])
        records = lambda cfg, dit, tok, n: packed_batches(cfg, dit, tok,
                                                          demo_records(cfg, dit, tok, 400), n)
        batches, times, flops, built = bench_model("demo", demo, peak, args, records)
        bench_packing(built, demo, batches, times, flops, args)
    if not args.skip_b:
        bench_model(f"dit{args.layers_b}x384", dit12x384_config(args.layers_b), peak, args,
                    b_batches)


if __name__ == "__main__":
    main()
