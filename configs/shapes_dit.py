"""The embedded default: a small DiT + word-level text encoder on the synthetic shapes world.

Derived from the Wan2.1 1.3B layout with CPU-sized widths: 6 blocks of width 192. Circles are the
hardest part of the budget: with 4 / 3 caption words for circle / square the model drew circles as
the rounded square it draws for squares (0-2 of 13 held-out circles read as circles, whatever the
width, depth, batch or image share), so captions name each shape with one word
(vdit/data/shapes_captions.py; 5 of 13 circles with it; 12 of 13 once the VAE decoded circles as
circles). Latents come from the shapes VAE (configs/shapes_vae.py: z_dim 8, 4x space, 4x time), so
a 9x32x32 clip is 3x8x8x8 latents and 48 tokens with (1, 2, 2) patches; 32x48 and 48x32 clips (72
tokens) and single frames (16 tokens) are packed alongside, two clips at most in a row of 96
tokens: short rows waste little of the attention on masked-out pairs (a step of 32 rows x 96 costs
0.65x one of 8 rows x 384 for the same clips), which buys more steps, and steps are what this
budget lacks. The DiT is image-to-video capable (Wan2.1 I2V input layout: in_channels = z + 4 mask
+ z condition channels): 30% of the training videos (never single frames) are given their first
frame, and 30% of those also their last (keyframe interpolation); text-to-video feeds a zero mask
and condition. `make demo` trains it on 2 CPU cores.

Matmuls take bfloat16 operands and sum in float32 (`matmul_dtype="bfloat16"`, as a TPU computes a
float32 matmul at default precision): XLA:CPU runs those on the AMX units of a CPU that has them
(Intel Xeon 4th gen and later), several times faster than float32 (vdit/models/mixed_dot.py); the
xla attention backend takes QK^T and PV the same way, with a hand-written backward
(vdit/models/attention_mixed.py). With matmuls that cheap, recomputing the whole block in the
backward pass (`remat="full"`) beats keeping anything: writing each layer's intermediates into the
scan's stacked residual buffers and reading them back costs more than recomputing them
(bench/train.py, demo step, bfloat16, on such a CPU: 0.57 s with none, 0.40 s with save_dots,
0.35 s with full). Both are config knobs; the model code is the TPU/GPU one. An AVX2-only CPU
(no bfloat16 units) runs the same step 4-5x slower, bfloat16 or not: 1.75-1.95 s on a 2-core AMD
EPYC, where `make demo` takes over an hour instead of ~25 minutes.

The word-level text encoder stays frozen at its random init, the stand-in for a frozen pretrained
encoder (Wan's UMT5): trained jointly from scratch it maps the circle and square words to nearly
one vector (cosine 0.9-0.97 between "circle", "ball", "square", "box", ...), because early on the
DiT's gradient barely tells those shapes apart; random features keep every word distinct.
"""

import ml_collections

from . import common, shapes_vae, wan2_1_t2v_1_3b

# The shapes world's caption words (vdit/data/shapes_captions.py `vocabulary`, over the colors of
# vdit/data/synthetic.py; a test keeps the two equal): word ids are their places in this list.
SHAPES_VOCAB = [
    "red", "yellow", "green", "cyan", "blue", "purple", "and", "circle", "square",
    "triangle", "right", "to", "the", "rightward", "left", "leftward", "up", "upward",
    "toward", "top", "down", "downward", "bottom", "moving", "drifting", "sliding",
    "gliding", "heading", "travelling", "moves", "drifts", "slides", "glides", "heads",
    "travels", "rolling", "rolls", "static", "stationary", "motionless", "standing",
    "still", "staying", "in", "place", "not", "stays", "does", "move", "a", "video",
    "shows", "is", "there", "that", ",", "clip", "of", "one",
]


def get_config() -> ml_collections.ConfigDict:
    config = wan2_1_t2v_1_3b.get_config()
    vae = shapes_vae.get_config()
    z_dim = vae.vae.z_dim
    config.model.update(dict(
        num_attention_heads=6, attention_head_dim=32, in_channels=2 * z_dim + 4, out_channels=z_dim,
        text_dim=128, freq_dim=64, ffn_dim=768, num_layers=6, dtype="float32",
        matmul_dtype="bfloat16", attention="xla", remat="full", micro_conditioning=[]))
    config.vae = vae.vae

    # Whole words of the world's lexicon: a caption is ~8 tokens (bytes: ~40), which cuts the text
    # encoder's and the cross-attention's share of a train step several-fold.
    config.text = ml_collections.ConfigDict(dict(
        kind="word", vocab=SHAPES_VOCAB, max_length=32, d_model=128,
        d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dtype="float32",
        trainable=False))

    config.data = common.packing()
    config.data.update(vae.data)  # the world the VAE was trained on
    # Records are read in the packer's thread (read_threads=0): Grain's 16 reader threads and
    # 500-record buffer cost 0.053 s of CPU per batch against 0.015, on a machine whose two cores
    # the train step also wants.
    config.data.update(dict(
        tokens_per_row=96, text_per_row=32, rows_per_batch=32, max_segments=2, pack_bins=8,
        caption_dropout=0.1, prefetch=2, read_threads=0, read_buffer=0))

    config.encode = ml_collections.ConfigDict(dict(
        source="synthetic", video_root="", caption_key="caption", vae_workdir="",
        tfds_data_dir="", tfds_video_key="", tfds_caption_key="caption",
        shapes=[(9, 32, 32), (1, 32, 32), (9, 32, 48), (9, 48, 32)],
        shape_weights=[0.8, 0.1, 0.05, 0.05], num_examples=3000, num_shards=4,
        batch_size=32, normalize="measure", stats_from="", seed=0, i2v_condition=True,
        last_frame_condition=True,
        # video files (a folder or manifest as source) are sampled at the world's 8 fps
        fps=config.data.fps, extensions=[], decode_threads=4))  # [] = every video suffix vdit knows

    config.flow = common.flow()
    # shift 2 at a 32x32 clip's 48 tokens, as the sampler's flow_shift: more training where the
    # object's place and motion are decided.
    config.flow.update(dict(shift_mode="resolution", shift=2.0, base_tokens=48, max_shift=3.0))
    config.optim = common.optim()
    config.optim.update(dict(lr=2e-3, warmup_steps=100, weight_decay=0.0))
    config.train = common.train()
    # 1400 steps (~0.46 s each on 2 cores with AMX) leave the 2000-step VAE its ~10 minutes
    # within `make demo`'s 25; 1600 steps on a weaker VAE drew fewer circles (shapes_vae.py).
    config.train.update(dict(steps=1400, ema_decay=0.99, log_every=25, i2v_rate=0.3,
                             last_frame_rate=0.3))
    config.checkpoint = common.checkpoint()
    config.checkpoint.update(dict(every=500, keep=2))
    config.sample = ml_collections.ConfigDict(dict(
        frames=9, height=32, width=32, steps=20, guidance=3.0, num_prompts=4, seed=0,
        scheduler=dict(_class_name="UniPCMultistepScheduler", num_train_timesteps=1000,
                       prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.0,
                       solver_order=2, predict_x0=True, solver_type="bh2",
                       lower_order_final=True)))
    config.lora = common.lora()
    config.mesh = common.mesh()
    return config
