"""`vdit convert`: a diffusers Wan2.1 pipeline folder <-> vdit runs, both directions.

    vdit convert --from diffusers --src weights/Wan2.1-T2V-1.3B-Diffusers --out runs/wan2_1_t2v_1_3b

reads a text-to-video or image-to-video pipeline folder (model_index.json, transformer/, vae/,
scheduler/, text_encoder/ + tokenizer/; Wan2.1 I2V adds image_encoder/ + image_processor/, its CLIP
tower, which the run keeps as OUT/image_encoder and OUT/image_processor and names in its config's
`image_encoder` section) and writes two vdit runs, each one step-0 checkpoint whose params and
EMA are the published weights:
  OUT       the DiT and the UMT5 text encoder ({"dit", "text"}), with a config holding the
            `model`, `text` (frozen; the tokenizer copied to OUT/tokenizer), `vae` and `sample`
            sections (the folder's scheduler, Wan's defaults, Wan's unmasked padded text) and
            `encode.vae_workdir` = OUT/vae; OUT/latents/stats.json holds the VAE config's latent
            statistics, which Wan's pipelines normalise with;
  OUT/vae   the VAE, as `vdit train-vae` lays out a run (what `encode.vae_workdir` names).
So `train.init_from=OUT` starts a stage from Wan2.1, and `vdit sample --workdir OUT` gives the
numbers diffusers' pipeline gives on the folder itself. Wan2.2 folders convert too: a two-expert
A14B folder's transformer_2/ (the low-noise expert, same config as transformer/) becomes the
weights' "dit_2" part and its boundary_ratio the config's `experts.boundary_ratio`; TI2V's
`expand_timesteps` becomes `sample.expand_timesteps`; `sample.pipeline_class` keeps the
folder's pipeline class for the way back.

    vdit convert --to diffusers --src runs/dit --out DIR

writes a vdit run (its latest checkpoint's EMA weights, LoRA merged, frozen parts filled in) as a
pipeline folder: transformer/, vae/ (from the run's `encode.vae_workdir`, its config carrying the
latent statistics of the run's shards so diffusers normalises as vdit trained), scheduler/ (the
run's `sample.scheduler`), model_index.json, for a UMT5 run text_encoder/ + tokenizer/, and for
an I2V run its image_encoder/ + image_processor/; a two-expert run adds transformer_2/ and
boundary_ratio, a TI2V run expand_timesteps. The
byte and word encoders of the synthetic recipes have no transformers tokenizer, so their folders
carry no text encoder (callers then pass text embeddings). model_index.json's private "_vdit"
key records what the run samples with beyond the pipeline class (vdit/convert/run_record.py:
text-to-video or not, text masking, sampling defaults), so vdit samples the folder as the run; a
run trained on packed captions attends its prompts' real tokens only, which diffusers' Wan
pipelines do not (they attend the zero-padded block): a warning says so.
"""

from __future__ import annotations

import json
import sys

import ml_collections
import numpy as np

from vdit import runs
from vdit.config import recipe_module, text_masked
from vdit.convert import diffusers_folder as folder_lib
from vdit.convert import run_record, wan
from vdit.convert.safetensors_io import read_config, read_json_dict
from vdit.convert.wan_dit import model_config_from_diffusers
from vdit.data.encode import load_stats
from vdit.models.dit import build_dit
from vdit.models.image import CONFIG_FIELDS as CLIP_FIELDS
from vdit.models.text import CONFIG_FIELDS, text_encoder_from_config
from vdit.models.tokenizers import load_tokenizer
from vdit.models.vae_config import vae_from_config
from vdit.runs import checkpoint, latents_dir
from vdit.train.init_from import run_weights

DIRECTIONS = (("diffusers", "vdit"), ("vdit", "diffusers"))
DIFFUSERS_VERSION = "0.35.0"
VAE_RUN = "vae"  # the VAE run's folder inside a converted run
TOKENIZER = "tokenizer"  # its UMT5 tokenizer's, copied from the pipeline folder
IMAGE_PARTS = ("image_encoder", "image_processor")  # Wan2.1 I2V's CLIP, kept beside the run
I2V_PIPELINE = "WanImageToVideoPipeline"


def convert(src_format: str | None, dst_format: str | None, src: str, out: str) -> dict:
    """Dispatches `vdit convert`; returns {name: path written}. Formats default to the other one
    of the pair (--from diffusers alone means --to vdit)."""
    src_format = src_format or ("vdit" if dst_format == "diffusers" else "diffusers")
    dst_format = dst_format or ("vdit" if src_format == "diffusers" else "diffusers")
    if (src_format, dst_format) not in DIRECTIONS:
        raise ValueError(f"--from {src_format} --to {dst_format}: vdit converts diffusers -> vdit "
                         "or vdit -> diffusers")
    if runs.user_path(out).exists() and any(runs.user_path(out).iterdir()):
        raise ValueError(f"--out {out!r} exists and is not empty; choose a new folder")
    if src_format == "diffusers":
        return from_diffusers(src, out)
    return to_diffusers(src, out)


# ---------------------------------------------------------------------- diffusers -> vdit
def from_diffusers(src: str, out: str) -> dict:
    """Writes the runs OUT and OUT/vae described in the module docstring."""
    index = folder_lib.read_index(src)
    for name in ("text_encoder", "tokenizer"):
        if not (runs.user_path(src) / name).is_dir():
            raise FileNotFoundError(f"{src}: no {name}/ folder; a vdit run needs the pipeline's "
                                    "UMT5 text encoder and its tokenizer")
    sub = lambda name: str(runs.user_path(src) / name)
    load_tokenizer(sub("tokenizer"), folder_lib.MAX_TEXT_TOKENS)  # fails here, not at sampling
    dit, dit_params = wan.load_transformer(sub("transformer"))
    text_model, text_params = wan.load_text_encoder(sub("text_encoder"))
    vae, vae_params = wan.load_vae(sub("vae"))
    mean, std = folder_lib.latent_stats(vae)
    vae_cfg = _vae_section(read_config(sub("vae")), mean, std)
    scheduler = read_json_dict(sub("scheduler/scheduler_config.json"))
    image = _read_image_encoder(src, index) if dit.has_image_branch else None
    weights = {"dit": dit_params, "text": text_params}
    if index.get("boundary_ratio") is not None:
        weights["dit_2"] = _read_low_noise_expert(src)

    out = str(runs.absolute(out))
    vae_run = str(runs.user_path(out) / VAE_RUN)
    tokenizer = str(runs.user_path(out) / TOKENIZER)
    config = _run_config(read_config(sub("transformer")), text_model, tokenizer, vae_cfg,
                         scheduler, vae_run, folder_lib.sampling_defaults(index))
    config.sample.mask_text = folder_lib.folder_masks_text(index)
    if image is not None:
        config.image_encoder = _image_section(image[0], out)
    vdit_t2v = run_record.KEY in index and not folder_lib.folder_image_only(index)
    if not (vdit_t2v and index["_class_name"] == I2V_PIPELINE):
        config.sample.pipeline_class = index["_class_name"]
    # else a vdit run's I2V-channel folder that also does text-to-video: without pipeline_class
    # the run is not image-only, and the way back picks the I2V class from its channels (a
    # published folder, TI2V's I2V one included, keeps its class)
    if index.get("expand_timesteps"):
        config.sample.expand_timesteps = True
    if "dit_2" in weights:
        config.experts = ml_collections.ConfigDict({"boundary_ratio": index["boundary_ratio"]})
    checkpoint.write_weights(out, 0, weights, weights, config)
    runs.copy_tree(sub("tokenizer"), tokenizer)  # the run is whole where it is copied to
    written = {"run": out, "vae_run": vae_run, "tokenizer": tokenizer}
    if image is not None:
        wan.save_image_encoder(*image, config.image_encoder.image_encoder_path)
        runs.copy_tree(sub("image_processor"), config.image_encoder.image_processor_path)
        written |= {name: config.image_encoder[f"{name}_path"] for name in IMAGE_PARTS}
    checkpoint.write_weights(vae_run, 0, vae_params, vae_params,
                             ml_collections.ConfigDict({
                                 "vae": vae_cfg, "checkpoint": recipe_module("common").checkpoint()}))
    stats = runs.stats_path(runs.user_path(out) / "latents")
    stats.parent.mkdir(parents=True, exist_ok=True)
    stats.write_text(json.dumps({"mean": mean.tolist(), "std": std.tolist()}))
    return written


def _read_low_noise_expert(src: str):
    """transformer_2/'s parameters; a vdit run holds both experts under one `model` section, so
    the two configs must agree."""
    sub = lambda name: str(runs.user_path(src) / name)
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    high, low = strip(read_config(sub("transformer"))), strip(read_config(sub("transformer_2")))
    if high != low:
        diff = sorted(k for k in high.keys() | low.keys() if high.get(k) != low.get(k))
        raise ValueError(f"{src}: transformer_2/ config differs from transformer/'s in {diff}; a "
                         "vdit run holds two experts of one config")
    return wan.load_transformer(sub("transformer_2"))[1]


def _read_image_encoder(src: str, index: dict):
    """Wan2.1 I2V's CLIP tower and its preprocessing, read (and so checked) before any write."""
    for name in IMAGE_PARTS:
        if not (index.get(name) and index[name][0] is not None
                and (runs.user_path(src) / name).is_dir()):
            raise FileNotFoundError(f"{src}: the transformer has an image branch (Wan2.1 I2V) but "
                                    f"the pipeline has no {name}/ component")
    wan.read_image_processor(str(runs.user_path(src) / "image_processor"))
    return wan.load_image_encoder(str(runs.user_path(src) / "image_encoder"))


def _image_section(encoder, out: str) -> ml_collections.ConfigDict:
    """The run config's `image_encoder`: transformers' CLIPVisionConfig names and where the run
    keeps OUT/image_encoder (transformers layout) and OUT/image_processor."""
    return ml_collections.ConfigDict(
        {f: getattr(encoder, f) for f in CLIP_FIELDS} | {"projection_dim": encoder.projection_dim}
        | {f"{name}_path": str(runs.user_path(out) / name) for name in IMAGE_PARTS})


def _vae_section(cfg: dict, mean: np.ndarray, std: np.ndarray) -> ml_collections.ConfigDict:
    values = {k: v for k, v in cfg.items() if not k.startswith("_")}
    values |= {"latents_mean": mean.tolist(), "latents_std": std.tolist()}
    vae_from_config(values)  # validates every key before anything is written
    return ml_collections.ConfigDict(values)


def _run_config(dit_cfg: dict, text_model, tokenizer_path: str, vae_cfg, scheduler: dict,
                vae_run: str, wan_defaults: dict) -> ml_collections.ConfigDict:
    common = recipe_module("common")
    config = ml_collections.ConfigDict()
    config.model = model_config_from_diffusers(dit_cfg, dtype="float32", attention="auto",
                                               remat="none")
    config.text = ml_collections.ConfigDict(
        {f: getattr(text_model, f) for f in CONFIG_FIELDS} | dict(
            kind="umt5", tokenizer_path=tokenizer_path, max_length=folder_lib.MAX_TEXT_TOKENS,
            dtype="float32", trainable=False))
    config.vae = vae_cfg
    config.data = common.packing()
    config.data.update(dict(frames=wan_defaults["frames"], height=wan_defaults["height"],
                            width=wan_defaults["width"], fps=wan_defaults["fps"]))
    config.encode = ml_collections.ConfigDict(dict(vae_workdir=vae_run))
    # Wan attends to all 512 text positions (padding zeroed), not only the prompt's tokens.
    config.sample = ml_collections.ConfigDict(dict(
        steps=wan_defaults["steps"], guidance=wan_defaults["guidance"],
        frames=wan_defaults["frames"], height=wan_defaults["height"],
        width=wan_defaults["width"], mask_text=False, scheduler=scheduler))
    config.train = common.train()
    config.checkpoint = common.checkpoint()
    config.lora = common.lora()
    config.mesh = common.mesh()
    return config


# ---------------------------------------------------------------------- vdit -> diffusers
def to_diffusers(src: str, out: str) -> dict:
    """Writes the pipeline folder described in the module docstring."""
    weights, saved = run_weights(src, "ema")
    config = ml_collections.ConfigDict(saved)
    if config.sample.scheduler.get("_class_name") == "ConsistencySampler":
        # diffusers' schedulers cannot express its step grid: the folder would not load, or
        # would sample a few-step student on the wrong times
        raise ValueError(f"run {src!r} is a few-step student (sample.scheduler "
                         "ConsistencySampler), which no diffusers scheduler reproduces: sample it "
                         "with `vdit sample`, or write its adapter with `vdit export --adapter`")
    vae_run = config.get("encode", {}).get("vae_workdir", "")
    if not vae_run:
        raise ValueError(f"run {src!r} has no encode.vae_workdir: its VAE is needed for vae/")
    vae_params, vae_saved = checkpoint.load_params(vae_run)
    stats = load_stats(latents_dir(config, src))
    sub = lambda name: str(runs.user_path(out) / name)
    dit = build_dit(config.model)
    wan.save_transformer(dit, weights["dit"], sub("transformer"))
    vae_cfg = dict(vae_saved["vae"]) | {"latents_mean": list(stats["mean"]),
                                        "latents_std": list(stats["std"])}
    wan.save_vae(vae_from_config(vae_cfg), vae_params, sub("vae"))
    scheduler = dict(config.sample.scheduler)
    runs.user_path(sub("scheduler")).mkdir(parents=True, exist_ok=True)
    runs.user_path(sub("scheduler/scheduler_config.json")).write_text(json.dumps(scheduler,
                                                                                  indent=2))
    none = [None, None]
    pipeline = config.sample.get("pipeline_class") or (
        I2V_PIPELINE if dit.in_channels != dit.out_channels else "WanPipeline")
    index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"],
             "scheduler": ["diffusers", scheduler.get("_class_name", "UniPCMultistepScheduler")],
             "text_encoder": none, "tokenizer": none,
             run_record.KEY: run_record.of_run(config, folder_lib.run_image_only(config),
                                               text_masked(config))}
    written = {"transformer": sub("transformer"), "vae": sub("vae"),
               "scheduler": sub("scheduler")}
    if config.sample.get("expand_timesteps"):
        index["expand_timesteps"] = True
    if "dit_2" in weights:
        wan.save_transformer(dit, weights["dit_2"], sub("transformer_2"))
        index |= {"transformer_2": ["diffusers", "WanTransformer3DModel"],
                  "boundary_ratio": float(config.experts.boundary_ratio)}
        written["transformer_2"] = sub("transformer_2")
    if config.text.get("kind") == "umt5":
        text_model, _ = text_encoder_from_config(config.text)
        wan.save_text_encoder(text_model, weights["text"], sub("text_encoder"))
        runs.copy_tree(config.text.tokenizer_path, sub("tokenizer"))
        index |= {"text_encoder": ["transformers", "UMT5EncoderModel"],
                  "tokenizer": ["transformers", "T5TokenizerFast"]}
        written |= {"text_encoder": sub("text_encoder"), "tokenizer": sub("tokenizer")}
    if config.get("image_encoder", {}).get("image_encoder_path"):
        encoder, encoder_params = wan.load_image_encoder(config.image_encoder.image_encoder_path)
        wan.save_image_encoder(encoder, encoder_params, sub("image_encoder"))
        runs.copy_tree(config.image_encoder.image_processor_path, sub("image_processor"))
        arch = ("CLIPVisionModelWithProjection" if encoder.projection_dim is not None
                else "CLIPVisionModel")
        index |= {"image_encoder": ["transformers", arch],
                  "image_processor": ["transformers", "CLIPImageProcessor"]}
        written |= {name: sub(name) for name in IMAGE_PARTS}
    runs.user_path(sub("model_index.json")).write_text(json.dumps(index, indent=2))
    if text_masked(config):
        print(f"vdit convert: warning: run {src!r} attends its prompts' real tokens only; "
              "diffusers' Wan pipelines attend the zero-padded prompt, so only vdit (its "
              "Generator or `vdit sample`) reproduces this run from the folder", file=sys.stderr)
    return written
