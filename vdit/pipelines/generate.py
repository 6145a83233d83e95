"""Generation: text-to-video (and, built on it, image- and video-to-video) with a flow sampler
and classifier-free guidance over the DiT, then the VAE's chunked decode.

    gen = Generator.from_workdir("runs/dit")            # a vdit run (DiT + its VAE + text encoder)
    gen = Generator.from_diffusers(path)                # a diffusers Wan pipeline folder
    latents = gen.text_to_video(context, negative_context, noise, steps=4, guidance=5.0,
                                output="latent")        # context [B, L, D_txt]; noise [B,T',H',W',C]
    video = gen.generate(["a red circle moving right"], frames=9, height=32, width=32, seed=0)

Latents handed to and returned by the sampler are normalised ((z - mean) / std, per channel); the
VAE decodes z = latents * std + mean. The sampling loop compiles once per shape and step count.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdit.data import patches
from vdit.diffusion.samplers import Sampler, cfg_velocity, make_sampler

# vdit runs sample with Wan2.1's diffusers default solver unless the config says otherwise.
DEFAULT_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000,
                     "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                     "flow_shift": 3.0, "solver_order": 2, "predict_x0": True,
                     "solver_type": "bh2", "lower_order_final": True}


@dataclasses.dataclass(frozen=True)
class GuidedDiT:
    """velocity_fn(x, timesteps, params, cond, uncond) for the sampler; hashable so the loop
    compiles once. cond/uncond = (context [B, L, D], context_segment_ids [B, L]).

    `mask_text`: a token sees only its prompt's real text tokens (vdit-trained models, which
    train on packed, unpadded text); False attends to every position, as Wan2.1 does."""

    dit: Any
    guidance: float
    mask_text: bool

    def __call__(self, x, timesteps, params, cond, uncond):
        return cfg_velocity(functools.partial(self._model, params), self.guidance)(
            x, timesteps, cond, uncond)

    def _model(self, params, x, timesteps, cond):
        context, context_ids = cond
        if not self.mask_text:
            return self.dit.apply({"params": params}, x, timesteps, context)
        b = x.shape[0]
        grid = patches.grid_shape(x.shape[1:], self.dit.patch_size)
        tokens = patches.patchify_batch(x, self.dit.patch_size)
        n = tokens.shape[1]
        positions = jnp.broadcast_to(jnp.asarray(patches.grid_positions(grid)), (b, n, 3))
        out = self.dit.apply({"params": params}, tokens, positions, jnp.ones((b, n), jnp.int32),
                             timesteps[:, None], context, context_ids, method="packed")
        return patches.unpatchify_batch(out, grid, self.dit.patch_size)


@dataclasses.dataclass
class Generator:
    dit: Any
    dit_params: Any
    vae: Any
    vae_params: Any
    sampler: Sampler
    latents_mean: np.ndarray
    latents_std: np.ndarray
    text_model: Any = None
    text_params: Any = None
    tokenizer: Any = None
    mask_text: bool = False
    defaults: dict = dataclasses.field(default_factory=lambda: {"steps": 30, "guidance": 5.0})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_workdir(cls, workdir: str, which: str = "ema") -> Generator:
        """A trained vdit run: its DiT (EMA weights), text encoder, VAE and latent statistics."""
        from vdit.data.encode import load_stats
        from vdit.models.dit import build_dit
        from vdit.models.text import text_encoder_from_config
        from vdit.models.vae_config import vae_from_config
        from vdit.train.checkpoint import load_params
        from vdit.train.loop import latents_dir, restore_frozen

        params, saved = load_params(workdir, which)
        config = ml_collections.ConfigDict(saved)
        dit = build_dit(config.model)
        text_model, tokenizer = text_encoder_from_config(config.text)
        text_params = params["text"] if "text" in params else restore_frozen(config)["text"]
        vae_params, _ = load_params(config.encode.vae_workdir)
        stats = load_stats(latents_dir(config, workdir))
        sampler = make_sampler(dict(config.sample.scheduler))
        return cls(dit, params["dit"], vae_from_config(config.vae), vae_params, sampler,
                   np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32),
                   text_model, text_params, tokenizer, mask_text=True,
                   defaults={"steps": config.sample.steps, "guidance": config.sample.guidance})

    # ------------------------------------------------------------------ pieces
    def encode_text(self, prompts: list[str]) -> tuple[jax.Array, jax.Array]:
        """Prompts -> (context [B, L, D], mask [B, L]) with Wan's zeroed padding."""
        from vdit.models.text import encode_prompts

        if self.text_model is None:
            raise ValueError("this Generator has no text encoder: pass context embeddings")
        context = encode_prompts(self.text_model, self.text_params, self.tokenizer, prompts)
        _, mask = self.tokenizer(list(prompts))
        return context, jnp.asarray(mask, jnp.int32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Normalised latents [B, T', H', W', C] -> video [B, T, H, W, 3] in [-1, 1]."""
        z = latents * jnp.asarray(self.latents_std) + jnp.asarray(self.latents_mean)
        return _decode(self.vae, self.vae_params, z)

    # ------------------------------------------------------------------ workflows
    def text_to_video(self, context, negative_context, noise, steps: int | None = None,
                      guidance: float | None = None, output: str = "video",
                      context_mask=None, negative_mask=None, start_step: int | None = None):
        """Samples from `noise` [B, T', H', W', C] (normalised latent space) given text
        embeddings; returns latents (output="latent") or decoded video [B, T, H, W, 3]."""
        if output not in ("latent", "video"):
            raise ValueError(f"output={output!r}; expected 'latent' or 'video'")
        steps = self.defaults["steps"] if steps is None else steps
        guidance = self.defaults["guidance"] if guidance is None else guidance
        b = noise.shape[0]
        for name, ctx in (("context", context), ("negative_context", negative_context)):
            if ctx is not None and (ctx.ndim != 3 or ctx.shape[0] != b):
                raise ValueError(f"{name} must be [B={b}, L, D_txt], got {tuple(ctx.shape)}")
        ones = lambda c: jnp.ones(c.shape[:2], jnp.int32)
        cond = (context, ones(context) if context_mask is None else context_mask)
        uncond = None
        if negative_context is not None:
            uncond = (negative_context,
                      ones(negative_context) if negative_mask is None else negative_mask)
        velocity = GuidedDiT(self.dit, float(guidance), self.mask_text)
        latents = self.sampler.sample(velocity, noise, steps, self.dit_params, cond, uncond,
                                      start_step=start_step)
        return latents if output == "latent" else self.decode(latents)

    def generate(self, prompts: list[str], frames: int, height: int, width: int, seed: int = 0,
                 steps: int | None = None, guidance: float | None = None,
                 negative_prompt: str = "") -> jax.Array:
        """Prompts -> videos [B, frames, height, width, 3] in [-1, 1]."""
        noise = jax.random.normal(jax.random.key(seed), (len(prompts),
                                                         *self.latent_shape(frames, height, width)))
        context, mask = self.encode_text(list(prompts))
        neg, neg_mask = self.encode_text([negative_prompt] * len(prompts))
        return self.text_to_video(context, neg, noise, steps, guidance, "video", mask, neg_mask)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        from vdit.config import check_frames

        check_frames("--frames", frames)
        f, tf = self.vae.spatial_factor, self.vae.temporal_factor
        stride = f * self.dit.patch_size[1]
        for name, size in (("height", height), ("width", width)):
            if size % stride:
                raise ValueError(f"{name}={size} must be a multiple of {stride} (VAE x patch)")
        return (1 + (frames - 1) // tf, height // f, width // f, self.vae.z_dim)


@functools.partial(jax.jit, static_argnums=0)
def _decode(vae, params, z):
    return vae.apply({"params": params}, z, method="decode")


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {path}")
    with open(path) as f:
        return json.load(f)
