"""`vdit export`: a run's complete weights as a standalone vdit run (LoRA merged, frozen parts
filled in), for sampling, sharing, and as the `train.init_from` of later runs.

    vdit export --workdir runs/lora --out runs/lora_merged
    vdit sample --workdir runs/lora_merged --prompt "a red circle moving right" --out out.mp4

The output workdir holds one checkpoint, at the source's step, whose state is
{"step", "params", "ema"} with params and EMA each the complete {"dit", "text"} weights
(`vdit.train.init_from.run_weights`), and the source's config with LoRA off, no init_from and
`data.latents_dir` pointing at the source's latents (their statistics are needed to sample). It
is not a resumable training state (no optimizer). For diffusers' layout instead, pass the same
weights to `vdit.convert.wan.save_transformer(build_dit(config.model), weights["dit"], out_dir)`.

`vdit export --adapter` writes a LoRA run's adapter alone instead (e.g. a `vdit distill` LoRA
student: a few-step adapter for its teacher): OUT/adapter.safetensors, one tensor per factor named
by its DiT kernel's path ("blocks/attn1/to_q/kernel/a" [*layers, *in, rank], ".../b"
[*layers, rank, *out]; merged kernel = kernel + a @ b * alpha / rank, vdit/models/lora.py), and
OUT/adapter_config.json: rank, alpha, targets, the base run, the run's sampler settings and
`adapters` (which DiT each adapter adapts). A two-expert run's low-noise adapter (`lora_2`, for
`dit_2`) is written beside it with its names prefixed "dit_2/".
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import save

from vdit import runs
from vdit.models import lora
from vdit.runs import checkpoint
from vdit.train.init_from import resolve, run_weights

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


def standalone_config(saved: dict, workdir: str) -> ml_collections.ConfigDict:
    """The source run's config, made self-contained (no LoRA, no init_from)."""
    config = ml_collections.ConfigDict(saved)
    if "lora" in config:
        config.lora.enabled = False
    config.train.init_from = ""
    if "data" in config:
        config.data.latents_dir = str(runs.absolute(runs.latents_dir(config, workdir)))
    return config


def export_run(src: str, out: str) -> str:
    """Writes the complete weights of the run at `src` (workdir or step folder) to a new run
    folder `out`; returns the checkpoint step folder written."""
    workdir, step = resolve(src)
    step = checkpoint.latest_step(workdir) if step is None else step
    if runs.checkpoints_dir(out).is_dir() and any(runs.checkpoints_dir(out).iterdir()):
        raise ValueError(f"--out {out!r} already holds checkpoints; choose a new folder")
    path = str(runs.checkpoints_dir(workdir) / str(step))
    params, saved = run_weights(path, "params")
    ema, _ = run_weights(path, "ema")
    config = standalone_config(saved, workdir)
    checkpoint.write_weights(out, step, params, ema, config)
    return str(runs.checkpoints_dir(out) / str(step))


def export_adapter(src: str, out: str) -> str:
    """Writes the LoRA adapter of the run at `src` (EMA weights) to the folder `out` (see the
    module doc); returns the safetensors path. A run without adapters is an error."""
    workdir, step = resolve(src)
    params, saved = checkpoint.load_params(workdir, "ema", step)
    adapters = {k: dit for k, dit in lora.ADAPTED.items() if k in params}
    if not adapters:
        raise ValueError(f"--workdir {src!r} holds no LoRA adapter (its weights are "
                         f"{sorted(params)}): --adapter exports LoRA runs (lora.enabled=True)")
    folder = runs.user_path(out)
    if (folder / ADAPTER_FILE).exists():
        raise ValueError(f"--out {out!r} already holds an {ADAPTER_FILE}; choose a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    flat = {}
    for key, dit in adapters.items():
        prefix = "" if key == "lora" else f"{dit}/"
        flat |= {prefix + k: v for k, v in
                 traverse_util.flatten_dict(params[key], sep="/").items()}
    data = save({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()})
    (folder / ADAPTER_FILE).write_bytes(data)
    settings = saved.get("lora", {})
    meta = {"rank": settings.get("rank"), "alpha": settings.get("alpha"),
            "targets": settings.get("targets"), "adapters": adapters,
            # the base run's step folder (pinned when the run started) and which of its weights
            "base": saved.get("train", {}).get("init_from", ""),
            "base_weights": saved.get("train", {}).get("init_from_weights", "params"), "sample": {
                k: saved.get("sample", {}).get(k) for k in ("steps", "guidance", "scheduler")}}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return str(folder / ADAPTER_FILE)
