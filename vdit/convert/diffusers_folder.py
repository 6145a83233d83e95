"""Reading a diffusers Wan2.1 pipeline folder into the pieces a `Generator` is built from.

A folder holds `model_index.json` and one sub-folder per component: `transformer/`, `vae/`,
`scheduler/scheduler_config.json` (required), `text_encoder/` + `tokenizer/` (optional: without
them, callers pass text embeddings), `image_encoder/` + `image_processor/` (Wan2.1 I2V's CLIP).
Latent normalisation uses the VAE config's `latents_mean` / `latents_std`, as diffusers' Wan
pipelines do (diffusers' own 16-channel defaults when the config leaves them out). Wan2.2 folders
load too: TI2V-5B (the 2.2 VAE, `expand_timesteps` in model_index.json) and the two-expert A14B
ones (`transformer_2/` the low-noise expert, `boundary_ratio` in model_index.json: the boundary
timestep is boundary_ratio * the scheduler's num_train_timesteps, as diffusers computes it).
A folder that `vdit convert --to diffusers` wrote also records what its run samples with
(vdit/convert/run_record.py): text masking, sampling defaults, whether it does text-to-video.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vdit import runs
from vdit.convert import run_record, wan
from vdit.convert.safetensors_io import read_json_dict
from vdit.diffusion.samplers import make_sampler
from vdit.models.tokenizers import load_tokenizer

# The Wan pipelines whose folders share this layout (the class only changes diffusers' __call__).
PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")
# diffusers' AutoencoderKLWan defaults, used when a 16-channel VAE config omits its statistics.
WAN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# diffusers' Wan __call__ defaults (and the fps its examples export with).
WAN_DEFAULTS = {"steps": 50, "guidance": 5.0, "frames": 81, "height": 480, "width": 832,
                "fps": 16.0}
# Wan2.2 TI2V-5B is a 720p, 24 fps model (Wan2.2's own config; diffusers' example exports at 24).
TI2V_DEFAULTS = {"frames": 121, "height": 704, "width": 1280, "fps": 24.0}
MAX_TEXT_TOKENS = 512  # Wan's max_sequence_length: prompts are padded to 512 tokens


# Weights the reference keeps in float32 whatever torch_dtype loads the rest in (by parameter
# path component): diffusers' WanTransformer3DModel._keep_in_fp32_modules, transformers' UMT5's.
KEEP_FLOAT32 = {"dit": ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"),
                "text": ("wo",), "image": ()}


def cast_weights(tree, dtype: str, keep: tuple[str, ...] = ()):
    """Host copies of `tree`'s floating leaves in `dtype` (a bfloat16 model held in bfloat16, as
    diffusers' torch_dtype does), except those under a path component named in `keep`; other
    leaves as they are."""
    def cast(path, x):
        x = np.asarray(x)
        kept = any(getattr(k, "key", None) in keep for k in path)
        if kept or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(jnp.dtype(dtype), copy=False)
    return jax.tree_util.tree_map_with_path(cast, tree)


def cast_run_weights(weights: dict, dtype: str) -> dict:
    """A run's complete weights {"dit", "text"[, "dit_2"]} cast as `cast_weights`, each part
    keeping what its reference keeps in float32."""
    return {name: cast_weights(tree, dtype, KEEP_FLOAT32["text" if name == "text" else "dit"])
            for name, tree in weights.items()}


def _record(index: dict) -> dict:
    return run_record.read(index, "model_index.json")


def sampling_defaults(index: dict) -> dict:
    """Steps, guidance, frames, size and fps to sample a folder of this model_index.json with:
    Wan's, or those of the vdit run that wrote it."""
    return (dict(WAN_DEFAULTS) | (TI2V_DEFAULTS if index.get("expand_timesteps") else {})
            | dict(_record(index).get("defaults", {})))


def is_image_only(pipeline_class: str | None, expand_timesteps: bool,
                  recorded: bool | None = None) -> bool:
    """An image-to-video pipeline whose model never saw text-to-video's zero condition (Wan2.1
    I2V, Wan2.2 I2V-A14B); TI2V-5B (`expand_timesteps`) does both. `recorded`: what a vdit run's
    folder says (its I2V-channel models may train text-to-video too), which wins."""
    if recorded is not None:
        return recorded
    return pipeline_class == "WanImageToVideoPipeline" and not expand_timesteps


def folder_image_only(index: dict) -> bool:
    return is_image_only(index["_class_name"], bool(index.get("expand_timesteps")),
                         _record(index).get("image_only"))


def run_image_only(config) -> bool:
    """Whether a vdit run of `config` does image-to-video only (a converted Wan I2V run)."""
    return is_image_only(config.sample.get("pipeline_class"),
                         bool(config.sample.get("expand_timesteps", False)))


def folder_masks_text(index: dict) -> bool:
    """Wan's pipelines attend the whole zero-padded prompt block; a packed-caption vdit run's
    folder records that its DiT attends the real tokens only."""
    return bool(_record(index).get("mask_text", False))


def is_pipeline_folder(path: str) -> bool:
    return (runs.user_path(path) / "model_index.json").is_file()


def looks_like_pipeline_folder(path: str) -> bool:
    """Component folders of a diffusers pipeline, whether or not model_index.json is there."""
    return all((runs.user_path(path) / name / "config.json").is_file()
               for name in ("transformer", "vae"))


def _has(index: dict, path: str, name: str) -> bool:
    """Whether model_index.json names component `name` and its folder exists."""
    entry = index.get(name)
    listed = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
    return listed and (runs.user_path(path) / name).is_dir()


def read_index(path: str) -> dict:
    """model_index.json, checked: a Wan pipeline with transformer, vae and scheduler (and, for
    Wan2.2 A14B, transformer_2 with boundary_ratio)."""
    if not runs.user_path(path).is_dir():
        raise FileNotFoundError(f"diffusers pipeline folder {path!r} does not exist")
    where = str(runs.user_path(path) / "model_index.json")
    index = read_json_dict(where)
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{where}: _class_name={name!r}; vdit loads {list(PIPELINES)}")
    two, ratio = _has(index, path, "transformer_2"), index.get("boundary_ratio")
    if two != (ratio is not None):
        raise ValueError(f"{where}: a two-expert Wan2.2 pipeline needs both transformer_2/ and "
                         f"boundary_ratio; got transformer_2/ {'present' if two else 'absent'}, "
                         f"boundary_ratio={ratio!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0.0 < ratio < 1.0):
        raise ValueError(f"{where}: boundary_ratio={ratio!r}; expected a number in (0, 1)")
    if index.get("expand_timesteps") and name == "WanVideoToVideoPipeline":
        raise NotImplementedError(f"{where}: expand_timesteps=true with {name} is not supported")
    run_record.read(index, where)
    for required in ("transformer", "vae", "scheduler"):
        if not _has(index, path, required):
            raise FileNotFoundError(f"{path}: the pipeline has no {required}/ component "
                                    f"(model_index.json: {index.get(required)!r})")
    return index


def latent_stats(vae) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 `[z_dim]` from the VAE config, as diffusers' pipelines read them."""
    mean, std = vae.latents_mean, vae.latents_std
    if mean is None or std is None:
        if vae.z_dim != len(WAN_LATENTS_MEAN):
            raise ValueError(f"the VAE config has no latents_mean/latents_std and z_dim="
                             f"{vae.z_dim} (diffusers' defaults cover 16 channels only)")
        mean, std = WAN_LATENTS_MEAN, WAN_LATENTS_STD
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (vae.z_dim,) or std.shape != (vae.z_dim,):
        raise ValueError(f"VAE latents_mean/latents_std have {mean.shape}/{std.shape} entries; "
                         f"z_dim={vae.z_dim} needs one per channel")
    return mean, std


def load_parts(path: str, dtype: str = "float32", attention: str = "auto") -> dict:
    """The Generator's fields from a pipeline folder (parameters placed on the default device).
    `attention`: the DiTs' backend; "auto" is the platform's kernel (splash on TPU, cuDNN on GPU,
    xla on CPU), as a converted run's config says: xla's [S, S] logits at Wan's 81x480x832 (32,760
    tokens) would not fit a chip. The CLIP image encoder (257 tokens) keeps xla, as in a run."""
    index = read_index(path)
    expand = bool(index.get("expand_timesteps"))  # Wan2.2 TI2V-5B
    sub = lambda name: str(runs.user_path(path) / name)
    # cast on the host, before the device holds them
    weights = lambda params, part="dit": jax.device_put(cast_weights(params, dtype,
                                                                     KEEP_FLOAT32[part]))
    dit, dit_params = wan.load_transformer(sub("transformer"), dtype=dtype, attention=attention)
    vae, vae_params = wan.load_vae(sub("vae"))
    if dit.out_channels != vae.z_dim:
        raise ValueError(f"{path}: transformer out_channels={dit.out_channels} differs from the "
                         f"VAE's z_dim={vae.z_dim}")
    mean, std = latent_stats(vae)
    sampler = make_sampler(read_json_dict(sub("scheduler/scheduler_config.json")))
    parts = dict(dit=dit, dit_params=weights(dit_params), vae=vae,
                 vae_params=jax.device_put(vae_params), sampler=sampler,
                 latents_mean=mean, latents_std=std, mask_text=folder_masks_text(index),
                 defaults=sampling_defaults(index), expand_timesteps=expand,
                 image_only=folder_image_only(index))
    if index.get("boundary_ratio") is not None:
        dit_2, dit_2_params = wan.load_transformer(sub("transformer_2"), dtype=dtype,
                                                   attention=attention)
        for key in ("in_channels", "out_channels", "patch_size"):
            if getattr(dit_2, key) != getattr(dit, key):
                raise ValueError(f"{path}: transformer_2 {key}={getattr(dit_2, key)} differs from "
                                 f"transformer's {getattr(dit, key)}")
        parts |= dict(dit_2=dit_2, dit_2_params=weights(dit_2_params),
                      boundary=float(index["boundary_ratio"]) * sampler.spec.num_train_timesteps)
    if _has(index, path, "text_encoder"):
        if not runs.user_path(sub("tokenizer")).is_dir():
            raise FileNotFoundError(f"{path}: text_encoder/ without tokenizer/")
        text_model, text_params = wan.load_text_encoder(sub("text_encoder"), dtype=dtype)
        parts |= dict(text_model=text_model, text_params=weights(text_params, "text"),
                      tokenizer=load_tokenizer(sub("tokenizer"), MAX_TEXT_TOKENS))
    if _has(index, path, "image_encoder"):
        parts |= image_parts(sub("image_encoder"), sub("image_processor"), dtype)
    return parts


def image_parts(encoder_dir: str, processor_dir: str, dtype: str = "float32",
                attention: str = "xla") -> dict:
    """The Generator's CLIP fields from an image_encoder/ and an image_processor/ folder."""
    encoder, encoder_params = wan.load_image_encoder(encoder_dir, dtype=dtype, attention=attention)
    return dict(image_encoder=encoder,
                image_encoder_params=jax.device_put(cast_weights(encoder_params, dtype,
                                                                  KEEP_FLOAT32["image"])),
                image_processor=wan.read_image_processor(processor_dir))
