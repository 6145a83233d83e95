"""Wan2.1 T2V 1.3B training, stage 3 of 3: high resolution (480x832, up to 81 frames) on a
filtered, high-quality clip set, starting from stage 2's weights (see configs/stage1_image.py).

The filtered set comes from this file's stricter `curate` section (longer, sharper, moving clips
without text overlays) and is encoded into this stage's own latents:

    vdit curate --config configs/stage3_hq.py --input raw_videos/ --output data/clips_hq
    vdit encode --config configs/stage3_hq.py --workdir runs/stage3_hq     # from data/clips_hq
    vdit train  --config configs/stage3_hq.py --workdir runs/stage3_hq \
        --config.train.init_from=runs/stage2_video      # the default
"""

import ml_collections

from . import curate, stage2_video


def get_config() -> ml_collections.ConfigDict:
    config = stage2_video.get_config()
    # 81 frames at 480x832 -> 21 x 30 x 52 = 32760 tokens: one clip per row.
    config.encode.update(dict(shapes=[(81, 480, 832), (49, 480, 832), (1, 480, 832)],
                              shape_weights=[0.5, 0.3, 0.2], batch_size=2,
                              source="data/clips_hq/clips.jsonl"))
    config.data.update(dict(frames=81, height=480, width=832, tokens_per_row=32768,
                            text_per_row=2048, rows_per_batch=32, max_segments=4, pack_bins=4))
    config.model.remat = "full"
    config.flow.max_shift = 7.0
    config.optim.update(dict(lr=2e-5, warmup_steps=200))
    config.train.update(dict(steps=10_000, init_from="runs/stage2_video"))
    config.sample.update(dict(frames=81, height=480, width=832))

    config.curate = curate.get_config().curate
    config.curate.cuts.min_clip_seconds = 5.1  # 81 frames at 16 fps
    config.curate.motion.min_motion = 0.02
    config.curate.scores.update(dict(min_sharpness=50.0, max_text=0.05, min_contrast=0.06))
    return config
