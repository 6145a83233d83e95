"""Wan2.2 text-to-video A14B: two 14B experts, derived from configs/wan2_1_t2v_14b.py.

Each expert has Wan2.1-T2V-14B's sizes and latent layout (Wan2.1's VAE). The high-noise expert
denoises timesteps >= `experts.boundary_ratio` * 1000 (0.875), the low-noise one the rest; the
published sampling: 40 steps, flow shift 12, guidance 4.0 (high) / 3.0 (low, `sample.guidance_2`,
`vdit sample --guidance-2`).
`vdit convert --from diffusers --src weights/Wan2.2-T2V-A14B-Diffusers --out runs/wan2_2_t2v_a14b`
writes both experts into one run ("dit" high, "dit_2" low), which `vdit sample` and `vdit convert
--to diffusers` use as diffusers does. `vdit train` trains the expert(s) `experts.train` names on
their own timestep range (vdit/train/experts.py): "high" (here: t >= 0.875, the other expert
frozen from train.init_from), "low" (t < 0.875), or "both" (half of each batch's rows per expert).

    vdit plan  --config configs/wan2_2_t2v_a14b.py --devices 32 --hbm-gb 95 --config.mesh.sequence=4
    vdit train --config configs/wan2_2_t2v_a14b.py --workdir runs/a14b_high --dry-run
"""

import ml_collections

from . import wan2_1_t2v_14b


def get_config() -> ml_collections.ConfigDict:
    config = wan2_1_t2v_14b.get_config()
    config.experts = ml_collections.ConfigDict(dict(boundary_ratio=0.875, train="high"))
    config.text.tokenizer_path = "weights/Wan2.2-T2V-A14B-Diffusers/tokenizer"
    config.encode.vae_workdir = "runs/wan2_2_t2v_a14b/vae"
    config.train.init_from = "runs/wan2_2_t2v_a14b"
    config.sample.update(dict(steps=40, guidance=4.0, guidance_2=3.0))  # Wan2.2's: 40 steps
    config.sample.scheduler["flow_shift"] = 12.0
    return config
