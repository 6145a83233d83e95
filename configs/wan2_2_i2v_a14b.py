"""Wan2.2 image-to-video A14B: derived from configs/wan2_2_t2v_a14b.py.

Both experts take Wan I2V's 36 input channels (16 noisy latents + 4 first-frame mask + 16
condition latents) and, unlike Wan2.1 I2V, no CLIP image branch; boundary_ratio 0.9, flow shift
5, guidance 3.5 for both experts. Every training clip is conditioned on its first frame.

    vdit train --config configs/wan2_2_i2v_a14b.py --workdir runs/a14b_i2v --dry-run
"""

import ml_collections

from . import wan2_2_t2v_a14b


def get_config() -> ml_collections.ConfigDict:
    config = wan2_2_t2v_a14b.get_config()
    config.model.in_channels = 36
    config.experts.boundary_ratio = 0.9
    config.text.tokenizer_path = "weights/Wan2.2-I2V-A14B-Diffusers/tokenizer"
    config.encode.update(dict(vae_workdir="runs/wan2_2_i2v_a14b/vae", i2v_condition=True))
    config.train.update(dict(i2v_rate=1.0, init_from="runs/wan2_2_i2v_a14b"))
    config.sample.update(dict(steps=40, guidance=3.5, guidance_2=3.5))  # Wan2.2's: 40 steps
    config.sample.scheduler["flow_shift"] = 5.0
    return config
