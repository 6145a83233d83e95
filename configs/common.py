"""Default config sections shared by the recipes in this folder (each recipe changes a few fields).

Recipes import it, and each other, relatively (`from . import common`, `from . import
wan2_1_t2v_1_3b as base`): `vdit.config` loads a config file as a module of its folder, so a
recipe is plain data and never imports vdit. Package code that fills a missing section (`vdit
plan`, `vdit convert`) reads the same defaults through `vdit.config.recipe_module("common")`.
"""

from __future__ import annotations

import ml_collections


def optim() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=100, schedule="cosine", decay_steps=0, end_lr_ratio=0.1,
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, clip_norm=1.0, grad_accum=1))


def checkpoint() -> ml_collections.ConfigDict:
    # replica_slice_min_bytes: an array replicated over R devices is written as R parallel slices
    # only when each slice is at least this big (vdit/runs/checkpoint.py; 0 = always slice).
    return ml_collections.ConfigDict(dict(every=500, keep=3, keep_every=0, async_save=True,
                                          replica_slice_min_bytes=4 * 2 ** 20))


def train() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=10_000, seed=0, ema_decay=0.999, log_every=10, max_bad_steps=3,
        peak_flops_per_device=0.0, tensorboard=True, progress=True, sample_every=0,
        init_from="", init_from_weights="params", i2v_rate=0.0,
        last_frame_rate=0.0,
        # A jax.profiler trace of `profile_steps` steps after `profile_skip` (vdit/train/step_loop.py).
        profile_steps=0, profile_skip=3,
        # JAX's persistent compilation cache (a local or gs:// folder; "" = off): a restarted or
        # requeued job loads its compiled step instead of compiling it again.
        compilation_cache_dir=""))


def lora() -> ml_collections.ConfigDict:
    """LoRA adapters (vdit/models/lora.py): off unless a recipe or --config.lora.enabled=True."""
    return ml_collections.ConfigDict(dict(
        enabled=False, rank=16, alpha=16.0,
        targets=[r"blocks/attn[12]/to_(q|k|v|out)/kernel$", r"blocks/ffn/linear_[12]/kernel$"]))


def flow() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        time_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, shift_mode="resolution",
        shift=1.0, base_tokens=256, max_shift=6.0))


def mesh() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))


def packing() -> ml_collections.ConfigDict:
    """The `data` keys of the packed pipeline (vdit/data/pipeline.py)."""
    return ml_collections.ConfigDict(dict(
        tokens_per_row=1024, text_per_row=256, rows_per_batch=8, max_segments=8, pack_bins=8,
        shuffle_seed=0, caption_dropout=0.1, num_workers=0, prefetch=2, text_format="ids",
        latents_dir="",
        # > 0: each clip's text laid out in its own block of this many positions, zero-padded
        # (the DiT attends to the pads, as Wan2.x does); 0: packed text, pads never attended
        text_pad_to=0,
        # Grain's record readers (its own defaults): threads that hide storage latency (gs://)
        read_threads=16, read_buffer=500))
