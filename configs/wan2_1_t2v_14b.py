"""Wan2.1 text-to-video 14B: derived from configs/wan2_1_t2v_1_3b.py by its published sizes.

dim 5120 (40 heads x 128), ffn 13824, 40 layers; weights sharded over fsdp (ZeRO-3), full remat.
Every other section (VAE, frozen UMT5, 480x832 x 81-frame data, optimizer, checkpoints) is the
1.3B recipe's; the run starts from Wan2.1-T2V-14B as a vdit run (`vdit convert --from diffusers
--src weights/Wan2.1-T2V-14B-Diffusers --out runs/wan2_1_t2v_14b`). See launch/README.md:

    vdit plan  --config configs/wan2_1_t2v_14b.py --devices 32 --frames 81 --size 720x1280 --hbm-gb 95
    vdit train --config configs/wan2_1_t2v_14b.py --workdir runs/wan14b --dry-run
"""

import ml_collections

from . import wan2_1_t2v_1_3b


def get_config() -> ml_collections.ConfigDict:
    config = wan2_1_t2v_1_3b.get_config()
    config.model.update(dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, remat="full"))
    config.text.tokenizer_path = "weights/Wan2.1-T2V-14B-Diffusers/tokenizer"
    config.data.rows_per_batch = 8
    config.encode.vae_workdir = "runs/wan2_1_t2v_14b/vae"
    config.optim.lr = 1e-5
    config.train.init_from = "runs/wan2_1_t2v_14b"
    config.sample.scheduler["flow_shift"] = 5.0
    return config
