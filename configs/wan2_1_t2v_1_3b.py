"""Wan2.1 text-to-video 1.3B: the published sizes, and a complete finetuning recipe at Wan's
native 480x832 x 81 frames.

`config.model` holds diffusers' WanTransformer3DModel names (built by `vdit.models.dit.build_dit`;
dtype/attention/remat are vdit knobs); `vae` and `text` are Wan2.1's VAE and frozen UMT5-XXL. A run
trained with this recipe starts from Wan2.1's weights as a vdit run (`train.init_from`), which
`vdit convert --from diffusers --src weights/Wan2.1-T2V-1.3B-Diffusers --out runs/wan2_1_t2v_1_3b`
writes (with the VAE run that `encode.vae_workdir` names), on the clips `vdit curate` lists:

    vdit encode --config configs/wan2_1_t2v_1_3b.py --workdir runs/wan_finetune
    vdit train  --config configs/wan2_1_t2v_1_3b.py --workdir runs/wan_finetune
    vdit train  --config configs/wan2_1_t2v_1_3b.py --workdir runs/wan_finetune --dry-run

The stage recipes (configs/stage1_image.py, ...) and the 14B ones derive from this file.
"""

import ml_collections

from . import common

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


def wan_scheduler(flow_shift: float) -> dict:
    """Wan's sampler: diffusers' UniPC with flow sigmas."""
    return dict(_class_name="UniPCMultistepScheduler", num_train_timesteps=1000,
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True)


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
        matmul_dtype="",  # "": matmuls in dtype; "bfloat16" with float32 dtype: see mixed_dot.py
        attention="auto",  # cudnn on GPU, splash on TPU, xla on CPU (vdit/models/attention.py)
        remat="save_dots",
    ))
    config.vae = wan_vae()
    config.text = umt5_xxl()

    # 81 frames at 480x832 -> 21 x 30 x 52 = 32760 tokens: one clip per row. Each clip's text
    # reaches the DiT zero-padded to 512 positions, all attended, as Wan trained and samples
    # (text_pad_to = text.max_length); the packed UMT5 input stays text_per_row tokens.
    config.data = common.packing()
    config.data.update(dict(
        frames=81, height=480, width=832, fps=16.0, tokens_per_row=32768, text_per_row=512,
        text_pad_to=512,
        rows_per_batch=32, max_segments=4, pack_bins=4, caption_dropout=0.1, num_workers=8))
    config.encode = ml_collections.ConfigDict(dict(
        source="data/clips/clips.jsonl", video_root="data/raw",
        caption_key="caption",  # "recaption": the text of curate's captioner
        vae_workdir="runs/wan2_1_t2v_1_3b/vae",
        tfds_data_dir="", tfds_video_key="", tfds_caption_key="caption",
        shapes=[(81, 480, 832), (49, 480, 832), (1, 480, 832)], shape_weights=[0.5, 0.3, 0.2],
        num_shards=256, batch_size=2, normalize="config", stats_from="", seed=0,
        # clips sampled at Wan's 16 fps (the source frame nearest each time), whatever the
        # source's rate: a 30 fps video's consecutive frames would teach slowed-down motion
        fps=config.data.fps, extensions=[], decode_threads=4))  # [] = every video suffix vdit knows

    config.flow = common.flow()
    config.flow.update(dict(shift_mode="resolution", base_tokens=256, max_shift=7.0))
    config.optim = common.optim()
    config.optim.update(dict(lr=2e-5, warmup_steps=200, weight_decay=0.01))
    config.train = common.train()
    config.train.update(dict(steps=10_000, ema_decay=0.9999, log_every=50,
                             init_from="runs/wan2_1_t2v_1_3b"))
    config.checkpoint = common.checkpoint()
    config.checkpoint.update(dict(every=1000, keep=3, keep_every=10_000))
    config.sample = ml_collections.ConfigDict(dict(
        frames=81, height=480, width=832, steps=50, guidance=5.0, scheduler=wan_scheduler(3.0)))
    config.lora = common.lora()
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    return config
