"""Wan2.1 T2V 1.3B training, stage 1 of 3: text-to-image (every clip T = 1) at ~256 px.

The stages run in their own workdirs; each later stage starts from the previous stage's weights
through `train.init_from` (set here by convention; change it with --config.train.init_from=PATH):

  stage1_image  images, 256 px                        init_from runs/wan2_1_t2v_1_3b
  stage2_video  low-res video (17-33 frames) + images init_from runs/stage1_image
  stage3_hq     480x832 video up to 81 frames, from a stricter curation (filtered) set
                                                      init_from runs/stage2_video

runs/wan2_1_t2v_1_3b is Wan2.1's published weights as a vdit run (DiT + UMT5-XXL), with its VAE
run in runs/wan2_1_t2v_1_3b/vae; both are written by
`vdit convert --from diffusers --src weights/Wan2.1-T2V-1.3B-Diffusers --out runs/wan2_1_t2v_1_3b`.
Stage 1 takes the frozen UMT5 text encoder (and the DiT) from it. The VAE is frozen in every
stage: it only encodes clips to latent shards (`vdit encode`, from the vdit VAE run at
`encode.vae_workdir`) from the clips listed at `encode.source` (the clips.jsonl manifest
`vdit curate` writes); the DiT trains on those latents.

    vdit encode --config configs/stage1_image.py --workdir runs/stage1_image
    vdit train  --config configs/stage1_image.py --workdir runs/stage1_image
"""

import ml_collections

from vdit.config import recipe
from vdit.train import defaults

WAN_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def wan_vae() -> ml_collections.ConfigDict:
    """Wan2.1's VAE (diffusers AutoencoderKLWan names): 8x space, 4x time, 16 latent channels."""
    return ml_collections.ConfigDict(dict(
        base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
        attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0,
        latents_mean=WAN_LATENTS_MEAN, latents_std=WAN_LATENTS_STD, in_channels=3, out_channels=3,
        scale_factor_temporal=4, scale_factor_spatial=8, dtype="float32", conv_impl="auto",
        use_tiling=True, tile_sample_min_height=256, tile_sample_min_width=256,
        tile_sample_stride_height=192, tile_sample_stride_width=192))


def umt5_xxl() -> ml_collections.ConfigDict:
    """Wan2.1's frozen text encoder (transformers UMT5Config names of google/umt5-xxl)."""
    return ml_collections.ConfigDict(dict(
        kind="umt5", tokenizer_path="weights/Wan2.1-T2V-1.3B-Diffusers/tokenizer", max_length=512,
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dtype="bfloat16",
        trainable=False))


def get_config() -> ml_collections.ConfigDict:
    config = recipe("wan2_1_t2v_1_3b")
    config.vae = wan_vae()
    config.text = umt5_xxl()

    config.data = defaults.packing()
    config.data.update(dict(
        frames=1, height=256, width=256, fps=16.0, tokens_per_row=4096, text_per_row=2048,
        rows_per_batch=256, max_segments=16, pack_bins=16, caption_dropout=0.1, num_workers=8))
    # 16 px per token: a 256x256 image is 256 tokens, 16 of them fill a row.
    config.encode = ml_collections.ConfigDict(dict(
        source="data/clips/clips.jsonl", video_root="data/raw", vae_workdir="runs/wan2_1_t2v_1_3b/vae",
        tfds_data_dir="", tfds_video_key="", tfds_caption_key="caption",
        shapes=[(1, 256, 256), (1, 256, 448), (1, 448, 256)], shape_weights=[0.6, 0.2, 0.2],
        num_shards=256, batch_size=16, normalize="config", seed=0))

    config.flow = defaults.flow()
    config.flow.update(dict(shift_mode="resolution", base_tokens=256, max_shift=5.0))
    config.optim = defaults.optim()
    config.optim.update(dict(lr=1e-4, warmup_steps=1000, weight_decay=0.01))
    config.train = defaults.train()
    config.train.update(dict(steps=50_000, ema_decay=0.9999, log_every=50,
                             init_from="runs/wan2_1_t2v_1_3b"))
    config.checkpoint = defaults.checkpoint()
    config.checkpoint.update(dict(every=1000, keep=3, keep_every=10_000))
    config.sample = ml_collections.ConfigDict(dict(
        frames=1, height=256, width=256, steps=50, guidance=5.0,
        scheduler=dict(_class_name="UniPCMultistepScheduler", num_train_timesteps=1000,
                       prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                       solver_order=2, predict_x0=True, solver_type="bh2",
                       lower_order_final=True)))
    config.lora = defaults.lora()
    config.mesh.update(dict(data=1, fsdp=-1))  # weights sharded over all devices (ZeRO-3)
    return config
