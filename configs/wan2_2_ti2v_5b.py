"""Wan2.2 text+image-to-video 5B (Wan2.2-TI2V-5B): derived from configs/wan2_1_t2v_1_3b.py.

The DiT at its published sizes (dim 3072 = 24 heads x 128, ffn 14336, 30 layers) over 48 latent
channels of the Wan2.2 VAE (residual blocks, 2x2 pixel patching: 16x space, 4x time, z 48, its
published latent statistics); native 121 frames at 704x1280, 24 fps: 31 x 44 x 80 latents, 27280
tokens a clip. Image-to-video samples with the image's clean latent as frame 0 at timestep 0
(`sample.expand_timesteps`), and training gives half the videos that clean first frame
(`train.i2v_rate`). `vdit convert --from diffusers --src weights/Wan2.2-TI2V-5B-Diffusers
--out runs/wan2_2_ti2v_5b` writes the run this recipe starts from.

    vdit plan  --config configs/wan2_2_ti2v_5b.py --devices 32 --hbm-gb 95 --config.mesh.sequence=4
    vdit train --config configs/wan2_2_ti2v_5b.py --workdir runs/ti2v --dry-run
"""

import ml_collections

from . import wan2_1_t2v_1_3b

WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
    0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
    -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
    -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
    0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]


def get_config() -> ml_collections.ConfigDict:
    config = wan2_1_t2v_1_3b.get_config()
    # full remat: 32 rows of 27280 tokens at save_dots need ~2x a v5p chip's HBM (`vdit plan`)
    config.model.update(dict(num_attention_heads=24, ffn_dim=14336, in_channels=48,
                             out_channels=48, remat="full"))
    config.vae.update(dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
                           patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
                           latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD))
    config.text.tokenizer_path = "weights/Wan2.2-TI2V-5B-Diffusers/tokenizer"
    # 121 frames at 704x1280 -> 31 x 44 x 80 = 27280 tokens: one clip per row.
    config.data.update(dict(frames=121, height=704, width=1280, fps=24.0))
    config.encode.update(dict(vae_workdir="runs/wan2_2_ti2v_5b/vae", fps=config.data.fps,
                              shapes=[(121, 704, 1280), (61, 704, 1280), (1, 704, 1280)]))
    config.train.init_from = "runs/wan2_2_ti2v_5b"
    # TI2V trains both tasks in one model: half the videos keep their clean first latent frame at
    # timestep 0 (no loss there), the rest are text-to-video (vdit/train/conditioning.py).
    config.train.i2v_rate = 0.5
    config.sample.update(dict(frames=121, height=704, width=1280, expand_timesteps=True))
    config.sample.scheduler["flow_shift"] = 5.0
    return config
