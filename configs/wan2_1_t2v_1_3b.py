"""Wan2.1 text-to-video 1.3B: the published transformer sizes (diffusers' config names).

`config.model` builds `vdit.models.dit.WanDiT` via `build_dit`; dtype/attention/remat are vdit knobs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,  # dim 1536
        in_channels=16,
        out_channels=16,
        text_dim=4096,  # UMT5-XXL width
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
        dtype="bfloat16",
        attention="auto",  # block_sparse on GPU and TPU, xla on CPU
        remat="save_dots",
    ))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
    return config
