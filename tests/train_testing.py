"""Shared by the trainer tests: tiny model/data overrides, latent shards of given clip shapes, and
a one-call tiny run of any recipe."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import test_train

from vdit.config import load_config
from vdit.data import sources
from vdit.models.tokenizers import ByteTokenizer
from vdit.models.vae_config import vae_from_config
from vdit.runs import checkpoint
from vdit.train import loop

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
# test_train's tiny sizes and schedule: runs of any recipe compile the same step (cached once).
TINY = test_train.TINY
IMAGES = [(1, 4, 4), (1, 4, 8), (1, 8, 4)]  # latent (t, h, w): T = 1 clips
VIDEOS = [(1, 4, 4), (2, 4, 8), (3, 4, 4), (2, 8, 4)]
CAPTIONS = ["a red circle moving left", "a blue square", "green triangle up"]


def write_shards(folder: str, shapes, count: int = 16, seed: int = 0) -> str:
    """One latent shard (8 channels) of `count` clips cycling through `shapes`; returns folder."""
    tok = ByteTokenizer(32)
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        t, h, w = shapes[i % len(shapes)]
        caption = CAPTIONS[i % len(CAPTIONS)]
        ids, mask = tok([caption])
        examples.append({"latents": rng.normal(size=(t, h, w, 8)).astype(np.float32) + i % 3,
                         "text": ids[0][: int(mask[0].sum())], "caption": caption})
    sources.write_shard(os.path.join(folder, "latents-00000-of-00001.array_record"), examples)
    return folder


def tiny_config(name: str, latents: str, *extra: str):
    """configs/<name>.py shrunk by TINY, reading the shards in `latents`, then `extra`."""
    return load_config(os.path.join(CONFIGS, f"{name}.py"),
                       TINY + [f"--config.data.latents_dir={latents}", *extra])


def train_tiny(name: str, workdir: str, latents: str, steps: int, *extra: str,
               samples_fn=None) -> list[dict]:
    """`steps` steps of TINY's 12-step schedule (a checkpoint every 2 steps)."""
    return loop.train(tiny_config(name, latents, *extra), workdir, stop_after=steps,
                      samples_fn=samples_fn)


def write_vae_run(workdir: str, config) -> None:
    """A zero-weight VAE of `config.vae` saved as a VAE run's EMA (what encode.vae_workdir names)."""
    vae = vae_from_config(config.vae)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(vae.init(jax.random.key(0),
                                                           jnp.zeros((1, 1, 4, 4, 3))))["params"])
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    saved = config.copy_and_resolve_references()
    del saved["model"]  # a VAE run's config has no DiT
    manager = checkpoint.make_manager(workdir, config.checkpoint, with_data=False)
    checkpoint.save(manager, 1, {"ema": params}, saved)
    manager.wait_until_finished()
