"""Wan2.1 T2V 1.3B training, stage 1 of 3: text-to-image (every clip T = 1) at ~256 px.

Derived from configs/wan2_1_t2v_1_3b.py (model, VAE, UMT5, optimizer, checkpointing) by its
image-sized data. The stages run in their own workdirs; each later stage starts from the previous
stage's weights through `train.init_from` (set here by convention; change it with
--config.train.init_from=PATH):

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

Each of a row's 16 images crosses its own 512 zero-padded text positions, as Wan's model does
(`data.text_pad_to`, from the base recipe): `vdit plan` counts 10.7 PFLOP of dense attention a
step on 64 devices against 5.3 with packed captions (--config.data.text_pad_to=0, which leaves
Wan's text layout: the first steps relearn it).
"""

import ml_collections

from . import wan2_1_t2v_1_3b


def get_config() -> ml_collections.ConfigDict:
    config = wan2_1_t2v_1_3b.get_config()
    # 16 px per token: a 256x256 image is 256 tokens, 16 of them fill a row.
    config.data.update(dict(frames=1, height=256, width=256, tokens_per_row=4096,
                            text_per_row=2048, rows_per_batch=256, max_segments=16, pack_bins=16))
    config.encode.update(dict(shapes=[(1, 256, 256), (1, 256, 448), (1, 448, 256)],
                              shape_weights=[0.6, 0.2, 0.2], batch_size=16))
    config.flow.max_shift = 5.0
    config.optim.update(dict(lr=1e-4, warmup_steps=1000))
    config.train.steps = 50_000
    config.checkpoint.keep_every = 10_000
    config.sample.update(dict(frames=1, height=256, width=256))
    return config
