"""What a trained vdit run samples with: its DiT (and a Wan2.2 run's second expert), text encoder,
VAE, latent statistics, sampler and sampling defaults, as the keyword arguments of
`vdit.pipelines.generate.Generator` (as `vdit/convert/diffusers_folder.py`'s `load_parts` does for
a diffusers pipeline folder)."""

from __future__ import annotations

import ml_collections
import numpy as np

from vdit import config as config_lib
from vdit.convert import diffusers_folder, run_record
from vdit.data.encode import load_stats
from vdit.diffusion.samplers import make_sampler
from vdit.models.dit import build_dit
from vdit.models.text import text_encoder_from_config
from vdit.models.vae_config import vae_from_config
from vdit.runs import latents_dir
from vdit.runs.checkpoint import load_params
from vdit.runs.run_kind import check_kind


def load_parts(config: ml_collections.ConfigDict, params: dict, workdir: str) -> dict:
    """Generator keywords of a run of `config` with complete weights `params` {"dit", "text"[,
    "dit_2"]} (host or device arrays), the VAE of `config.encode.vae_workdir` and the latent
    statistics of the run's latents folder (`workdir` locates the default one)."""
    dit = build_dit(config.model)
    text_model, tokenizer = text_encoder_from_config(config.text)
    vae_params, vae_saved = load_params(config.encode.vae_workdir)
    check_kind(vae_params, vae_saved, "vae", config.encode.vae_workdir, "its encode.vae_workdir")
    stats = load_stats(latents_dir(config, workdir))
    sampler = make_sampler(dict(config.sample.scheduler))
    expand = bool(config.sample.get("expand_timesteps", False))
    parts = dict(dit=dit, dit_params=params["dit"], vae=vae_from_config(config.vae),
                 vae_params=vae_params, sampler=sampler,
                 latents_mean=np.asarray(stats["mean"], np.float32),
                 latents_std=np.asarray(stats["std"], np.float32),
                 text_model=text_model, text_params=params["text"], tokenizer=tokenizer,
                 mask_text=config_lib.text_masked(config),
                 defaults=run_record.run_defaults(config), expand_timesteps=expand,
                 image_only=diffusers_folder.run_image_only(config))
    clip = config.get("image_encoder", {})
    if clip.get("image_encoder_path"):  # a converted Wan2.1 I2V run (vdit/convert/runs.py)
        parts.update(diffusers_folder.image_parts(clip.image_encoder_path,
                                                  clip.image_processor_path,
                                                  clip.get("dtype", "float32")))
    if "dit_2" in params:  # a two-expert (Wan2.2 A14B) run: both experts share config.model
        if "experts" not in config:
            raise ValueError(f"run {workdir!r} holds a second expert (dit_2) but its config has "
                             "no experts.boundary_ratio")
        parts.update(dit_2=dit, dit_2_params=params["dit_2"],
                     boundary=float(config.experts.boundary_ratio)
                     * sampler.spec.num_train_timesteps)
    return parts
