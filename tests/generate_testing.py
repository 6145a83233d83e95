"""Shared by the generation tests: tiny random diffusers Wan pipelines saved in diffusers' layout.

`t2v_pipeline` / `i2v_pipeline` build torch pipeline objects from tiny random modules (float32,
every parameter perturbed so norms, biases and tables are exercised) and save them with
`save_pretrained`; tests load the folder with `Generator.from_diffusers` and run the torch objects
as the reference.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

Z = 4  # latent channels of the tiny VAE
TEXT_DIM = 16
TEXT_LEN = 512  # diffusers' I2V attention splits image tokens off at 512 text tokens
VAE = dict(base_dim=8, z_dim=Z, num_res_blocks=1, latents_mean=[0.3, -0.2, 0.1, 0.5],
           latents_std=[1.5, 0.7, 2.0, 1.1])
DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=Z,
           out_channels=Z, text_dim=TEXT_DIM, freq_dim=8, ffn_dim=32, num_layers=2,
           cross_attn_norm=True, eps=1e-6, rope_max_seq_len=64)
CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8)
SCHEDULERS = {
    "unipc": lambda: UniPCMultistepScheduler(prediction_type="flow_prediction",
                                             use_flow_sigmas=True, flow_shift=3.0),
    "euler": lambda: FlowMatchEulerDiscreteScheduler(shift=5.0),
}


def _perturb(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return vae


def tiny_transformer(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return _perturb(WanTransformer3DModel(**(DIT | overrides)))


def t2v_pipeline(folder: str, scheduler: str = "unipc", with_text: bool = False,
                 **dit) -> WanPipeline:
    """A saved text-to-video pipeline; `with_text` adds a tiny UMT5 text_encoder/ and a word-level
    tokenizer/ (written next to diffusers' save, which cannot save a None tokenizer)."""
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(),
                       scheduler=SCHEDULERS[scheduler](), transformer=tiny_transformer(**dit))
    pipe.save_pretrained(folder)
    if with_text:
        add_text_encoder(folder)
    return pipe


# Wan2.2 TI2V-5B's shape at toy size: the 2.2 VAE (residual, 2x2 patches, 16x spatial), latents
# of Z22 channels straight into the DiT, per-token timesteps (`expand_timesteps`).
Z22 = 6
VAE22 = dict(base_dim=8, decoder_base_dim=12, z_dim=Z22, num_res_blocks=1, is_residual=True,
             patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
             latents_mean=[0.2, -0.1, 0.0, 0.4, -0.3, 0.1],
             latents_std=[1.2, 0.8, 1.5, 0.9, 1.1, 2.0])


def ti2v_pipeline(folder: str, scheduler: str = "unipc") -> WanPipeline:
    """A saved Wan2.2-TI2V-shaped text-to-video pipeline (expand_timesteps=True)."""
    torch.manual_seed(5)
    vae = AutoencoderKLWan(**VAE22).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                       scheduler=SCHEDULERS[scheduler](),
                       transformer=tiny_transformer(4, in_channels=Z22, out_channels=Z22),
                       expand_timesteps=True)
    pipe.save_pretrained(folder)
    return pipe


def ti2v_i2v_pipeline(folder: str, scheduler: str = "unipc") -> WanImageToVideoPipeline:
    """A saved Wan2.2-TI2V-shaped image-to-video pipeline: the image's clean latent is frame 0."""
    torch.manual_seed(6)
    vae = AutoencoderKLWan(**VAE22).eval()
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                   scheduler=SCHEDULERS[scheduler](), image_processor=None,
                                   image_encoder=None, expand_timesteps=True,
                                   transformer=tiny_transformer(7, in_channels=Z22,
                                                                out_channels=Z22))
    pipe.save_pretrained(folder)
    return pipe


def a14b_pipeline(folder: str, i2v: bool = False, boundary_ratio: float = 0.875,
                  scheduler: str = "unipc"):
    """A saved Wan2.2-A14B-shaped two-expert pipeline (high-noise `transformer`, low-noise
    `transformer_2`, different random weights); `i2v`: WanImageToVideoPipeline whose DiTs take
    z + 4 mask + z channels and no CLIP branch, as Wan2.2 I2V-A14B."""
    channels = dict(in_channels=2 * Z + 4) if i2v else {}
    high, low = tiny_transformer(11, **channels), tiny_transformer(12, **channels)
    kw = dict(tokenizer=None, text_encoder=None, vae=tiny_vae(), scheduler=SCHEDULERS[scheduler](),
              transformer=high, transformer_2=low, boundary_ratio=boundary_ratio)
    if i2v:
        pipe = WanImageToVideoPipeline(image_processor=None, image_encoder=None, **kw)
    else:
        pipe = WanPipeline(**kw)
    pipe.save_pretrained(folder)
    return pipe


def add_text_encoder(folder: str) -> None:
    from text_testing import torch_encoder, write_word_tokenizer

    words = sorted({"a", "red", "blue", "circle", "square", "moving", "left", "right", "up"})
    write_word_tokenizer(os.path.join(folder, "tokenizer"), words)
    cfg = dict(vocab_size=16, d_model=TEXT_DIM, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=16,
               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
    torch_encoder(cfg).save_pretrained(os.path.join(folder, "text_encoder"))
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index |= {"text_encoder": ["transformers", "UMT5EncoderModel"],
              "tokenizer": ["transformers", "T5TokenizerFast"]}
    with open(index_path, "w") as f:
        json.dump(index, f)


def i2v_pipeline(folder: str, scheduler: str = "unipc", flf: bool = False):
    """Wan2.1-I2V-shaped: in_channels = z + 4 (mask) + z, CLIP image branch; `flf` adds the
    first-last-frame position table (pos_embed_seq_len = 2 x CLIP tokens)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tokens = (CLIP["image_size"] // CLIP["patch_size"]) ** 2 + 1
    dit = tiny_transformer(1, in_channels=2 * Z + 4, image_dim=CLIP["hidden_size"],
                           added_kv_proj_dim=DIT["num_attention_heads"] * DIT["attention_head_dim"],
                           pos_embed_seq_len=2 * tokens if flf else None)
    torch.manual_seed(2)
    encoder = _perturb(CLIPVisionModel(CLIPVisionConfig(**CLIP)), 0.02)
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP["image_size"]},
                                   crop_size={"height": CLIP["image_size"],
                                              "width": CLIP["image_size"]})
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(),
                                   scheduler=SCHEDULERS[scheduler](), image_processor=processor,
                                   image_encoder=encoder, transformer=dit)
    pipe.save_pretrained(folder)
    return pipe


def text_embeddings(batch: int, length: int = TEXT_LEN, seed: int = 0):
    """(context, negative_context) float32 [B, L, TEXT_DIM], Wan-style zero padding after 7/3."""
    rng = np.random.default_rng(seed)
    ctx = rng.normal(size=(batch, length, TEXT_DIM)).astype(np.float32)
    neg = rng.normal(size=(batch, length, TEXT_DIM)).astype(np.float32)
    ctx[:, 7:], neg[:, 3:] = 0.0, 0.0
    return ctx, neg


def smooth_video(batch: int, frames: int = 9, height: int = 32, width: int = 32,
                 seed: int = 0) -> np.ndarray:
    """[B, T, H, W, 3] float32 in [-1, 1]: moving colour gradients (compress well in mp4)."""
    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(np.arange(frames), np.linspace(0, 1, height), np.linspace(0, 1, width),
                          indexing="ij")
    out = []
    for _ in range(batch):
        phase = rng.uniform(0, 2 * np.pi, 3)
        out.append(np.stack([np.sin(2 * np.pi * (x + y * k) + 0.3 * t + p)
                             for k, p in zip((0.5, 1.0, 1.5), phase)], -1))
    return (0.8 * np.stack(out)).astype(np.float32)
