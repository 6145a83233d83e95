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
`dit_2`) is written beside it with its names prefixed "dit_2/". The same adapters are also written
in diffusers' LoRA format (vdit/convert/wan_lora.py), OUT/pytorch_lora_weights.safetensors (and
pytorch_lora_weights_2.safetensors for `dit_2`), which diffusers loads onto the base model
exported to diffusers' layout with `pipe.load_lora_weights(OUT)` (the second with
`weight_name="pytorch_lora_weights_2.safetensors", load_into_transformer_2=True`) and `vdit sample
--lora` reads; they are left out, with the reason in adapter_config.json's "diffusers", when an
adapter sits on a layer diffusers' Wan transformer does not have.
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import save

from vdit import runs
from vdit.convert import wan_lora
from vdit.models import lora
from vdit.models.dit import build_dit
from vdit.runs import checkpoint
from vdit.train.init_from import resolve, run_weights

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", wan_lora.ADAPTER_CONFIG
DIFFUSERS_FILES = {"lora": "pytorch_lora_weights.safetensors",  # diffusers' default weight name
                   "lora_2": "pytorch_lora_weights_2.safetensors"}


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
    diffusers = _write_diffusers(folder, saved, {k: params[k] for k in adapters},
                                 float(settings["alpha"]) / int(settings["rank"]))
    meta = {"rank": settings.get("rank"), "alpha": settings.get("alpha"), "diffusers": diffusers,
            "targets": settings.get("targets"), "adapters": adapters,
            # the base run's step folder (pinned when the run started) and which of its weights
            "base": saved.get("train", {}).get("init_from", ""),
            "base_weights": saved.get("train", {}).get("init_from_weights", "params"), "sample": {
                k: saved.get("sample", {}).get(k) for k in ("steps", "guidance", "scheduler")}}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return str(folder / ADAPTER_FILE)


def _write_diffusers(folder, saved: dict, trees: dict, scale: float) -> dict | str:
    """Writes each adapter tree in diffusers' LoRA format; returns {tree: file name}, or why
    nothing was written."""
    if "model" not in saved:
        return "not written: the run's config has no model section"
    model = build_dit(ml_collections.ConfigDict(saved["model"]))
    try:
        tensors = {key: wan_lora.adapter_to_diffusers(model, tree, scale)
                   for key, tree in trees.items()}
    except ValueError as e:
        return f"not written: {e}"
    for key, flat in tensors.items():
        (folder / DIFFUSERS_FILES[key]).write_bytes(save(flat))
    return {key: DIFFUSERS_FILES[key] for key in tensors}
