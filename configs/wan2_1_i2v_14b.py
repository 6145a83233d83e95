"""Wan2.1 image-to-video 14B (Wan2.1-I2V-14B-480P / -720P): derived from configs/wan2_1_t2v_14b.py.

diffusers' WanTransformer3DModel config of those checkpoints: in_channels 36 (16 noisy latents +
4 first-frame mask + 16 condition latents), out_channels 16, and an image branch (`image_dim`
1280, `added_kv_proj_dim` 5120) that reads CLIP ViT-H/14's penultimate features of the first
frame (257 tokens of width 1280; the `image_encoder` section, transformers' CLIPVisionConfig names).
Every training clip is conditioned on its first frame (`train.i2v_rate` 1.0), as Wan2.1 I2V is
trained: its condition latents and its first frame's CLIP tokens.

    vdit convert --from diffusers --src weights/Wan2.1-I2V-14B-480P-Diffusers --out runs/wan2_1_i2v_14b
    vdit encode --config configs/wan2_1_i2v_14b.py --workdir runs/wan_i2v
    vdit train  --config configs/wan2_1_i2v_14b.py --workdir runs/wan_i2v --dry-run
    vdit train  --config configs/wan2_1_i2v_14b.py --workdir runs/wan_i2v
    vdit sample --workdir runs/wan_i2v --image first.png --prompt "..." --out i2v.mp4

`convert` writes the run (DiT + UMT5, OUT/vae, and the pipeline's CLIP tower as OUT/image_encoder
and OUT/image_processor). `encode` stores per clip the VAE latents, the first-frame condition
(`cond_latents`) and the first frame's CLIP tokens (`first_frame_clip_tokens` [257, 1280]),
computed with the tower that `image_encoder.image_encoder_path` / `image_processor_path` name (the
converted run's, the one `sample` also loads); `train` starts from the converted weights.
"""

import ml_collections

from . import wan2_1_t2v_14b


def clip_vit_h14() -> ml_collections.ConfigDict:
    """The CLIP vision tower Wan2.1 I2V ships in image_encoder/ (open-clip ViT-H/14 at 224 px)."""
    return ml_collections.ConfigDict(dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
        image_size=224, patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=1024))


def get_config() -> ml_collections.ConfigDict:
    config = wan2_1_t2v_14b.get_config()
    config.model.update(dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120))
    config.image_encoder = clip_vit_h14()
    config.image_encoder.update(dict(image_encoder_path="runs/wan2_1_i2v_14b/image_encoder",
                                     image_processor_path="runs/wan2_1_i2v_14b/image_processor"))
    config.text.tokenizer_path = "weights/Wan2.1-I2V-14B-480P-Diffusers/tokenizer"
    config.encode.update(dict(vae_workdir="runs/wan2_1_i2v_14b/vae", i2v_condition=True))
    config.train.update(dict(i2v_rate=1.0, init_from="runs/wan2_1_i2v_14b"))
    # Wan2.1's own i2v sampling at 480x832: 40 steps, flow shift 3 (5 is its 720p setting)
    config.sample.steps = 40
    config.sample.scheduler["flow_shift"] = 3.0
    return config
