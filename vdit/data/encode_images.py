"""`vdit encode`'s first-frame CLIP tokens for DiTs with an image branch (config.model.image_dim
set, Wan2.1 I2V); the record layout is `vdit/data/image_tokens.py`'s.

The CLIP tower and its preprocessing come from the config's `image_encoder` section:
- `image_encoder_path` + `image_processor_path`: a transformers CLIPVisionModel folder and a
  CLIPImageProcessor folder, as `vdit convert --from diffusers` keeps them beside a converted
  Wan2.1 I2V run (OUT/image_encoder, OUT/image_processor), read by the loader the caller passes
  (`vdit encode` passes `vdit.convert.diffusers_folder.image_parts`, the one `vdit sample` loads
  them with; the data layer does not import convert);
- else `seed`: random weights drawn from that seed (toy runs; nothing downloaded), preprocessed
  with CLIPImageProcessor's defaults at the tower's `image_size`.
Neither is an error naming both keys, so a real run never trains on random CLIP features.

Tokens: the clip's first frame [H, W, 3] in [-1, 1] -> uint8 (diffusers' rounding) ->
CLIPImageProcessor (bicubic resize of the shortest edge, center crop, CLIP mean/std) -> the
tower's penultimate hidden layer (`hidden_states[-2]`), which is what diffusers'
WanImageToVideoPipeline.encode_image and `Generator.image_tokens` compute from an image, so
training conditions on what sampling feeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import ConfigError
from vdit.data.image_tokens import RECORD_KEY, tokens_per_image
from vdit.models.image import encoder_from_dict, penultimate_features
from vdit.models.image_preprocess import PreprocessSettings, preprocess, to_uint8


def has_image_branch(config) -> bool:
    """True when the config's DiT reads CLIP image tokens (config.model.image_dim set)."""
    return "model" in config and config.model.get("image_dim") is not None


# (encoder_dir, processor_dir) -> {"image_encoder", "image_encoder_params", "image_processor"}
ImageLoader = Callable[[str, str], dict[str, Any]]


def load_encoder(config, loader: ImageLoader | None = None):
    """(CLIPVisionEncoder, params, PreprocessSettings) of `config.image_encoder` (module doc);
    `loader` reads the folders `image_encoder_path` / `image_processor_path` name. Errors name
    the config keys."""
    if "image_encoder" not in config:
        raise ConfigError("config.model.image_dim is set (a Wan2.1 I2V image branch) but the "
                          "config has no 'image_encoder' section (the CLIP tower whose tokens "
                          "`vdit encode` stores for it)")
    cfg = config.image_encoder
    if cfg.get("image_encoder_path"):
        if not cfg.get("image_processor_path"):
            raise ConfigError("config key 'image_encoder.image_encoder_path' is set but "
                              "'image_encoder.image_processor_path' is not (the CLIPImageProcessor "
                              "folder, OUT/image_processor of a converted Wan2.1 I2V run)")
        if loader is None:
            raise ValueError("config key 'image_encoder.image_encoder_path' names a CLIP folder, "
                             "but no loader for it was given: pass image_loader="
                             "vdit.convert.diffusers_folder.image_parts (as `vdit encode` does)")
        parts = loader(cfg.image_encoder_path, cfg.image_processor_path)
        module, params = parts["image_encoder"], parts["image_encoder_params"]
        settings = parts["image_processor"]
    elif cfg.get("seed") is not None:
        module = encoder_from_dict(cfg, where="config.image_encoder")
        size = module.image_size
        pixels = jnp.zeros((1, size, size, module.num_channels))
        # An "rbg" key: threefry would compile one kernel per parameter (seconds on a CPU).
        key = jax.random.key(int(cfg.seed), impl="rbg")
        params = nn.unbox(jax.jit(module.init)(key, pixels)["params"])
        settings = PreprocessSettings(shortest_edge=size, crop_height=size, crop_width=size)
    else:
        raise ConfigError("config.image_encoder gives neither 'image_encoder_path' (with "
                          "'image_processor_path': the CLIP tower of a converted Wan2.1 I2V run, "
                          "e.g. runs/wan2_1_i2v_14b/image_encoder) nor 'seed' (random weights, "
                          "toy runs only): `vdit encode` has no CLIP weights for the image branch")
    _check_matches(config, module)
    return module, params, settings


def _check_matches(config, module) -> None:
    """The loaded tower gives the tokens the DiT and the pipeline expect."""
    want = (tokens_per_image(config.image_encoder), int(config.model.image_dim))
    got = (module.num_positions, module.hidden_size)
    if got != want:
        raise ConfigError(f"the CLIP tower of config.image_encoder gives tokens [N, D] = "
                          f"{list(got)}, but config.image_encoder (image_size / patch_size) and "
                          f"'model.image_dim' expect {list(want)}")


def encode_fn(config, loader: ImageLoader | None = None) -> Callable | None:
    """video [B, T, H, W, 3] in [-1, 1] -> {RECORD_KEY: float32 numpy [B, N, image_dim]} from each
    clip's first frame; None when the config's DiT has no image branch. Weights load here (see
    `load_encoder`), so a missing tower fails before any clip is encoded."""
    if not has_image_branch(config):
        return None
    module, params, settings = load_encoder(config, loader)

    def fn(video) -> dict:
        pixels = preprocess(to_uint8(np.asarray(video[:, 0])), settings)
        return {RECORD_KEY: np.asarray(penultimate_features(module, params, pixels), np.float32)}
    return fn
