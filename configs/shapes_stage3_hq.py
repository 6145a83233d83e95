"""The staged shapes recipe, stage 3 of 3: higher resolution and longer clips (64 px, up to 17
frames) on a filtered set, starting from stage 2's weights (configs/shapes_stage1_image.py).

The synthetic world's stand-in for a stricter curation pass: only single-object clips with clearly
visible motion (`data.max_objects`, `data.speed_range`, read by the synthetic source at encode).
"""

import ml_collections

from . import shapes_stage2_video


def get_config() -> ml_collections.ConfigDict:
    config = shapes_stage2_video.get_config()
    # 17 frames at 64x64 -> 5 latent frames x 8 x 8 = 320 tokens.
    config.encode.update(dict(shapes=[(17, 64, 64), (9, 64, 64), (1, 64, 64)],
                              shape_weights=[0.4, 0.4, 0.2]))
    # A 17x64x64 clip is 320 tokens: rows of 384 (the demo's rows of 96 hold 32x32 clips).
    config.data.update(dict(frames=17, height=64, width=64, tokens_per_row=384,
                            text_per_row=128, rows_per_batch=8, max_segments=8))
    config.data.max_objects = 1
    config.data.speed_range = (0.2, 0.3)
    config.optim.update(dict(lr=2e-4, warmup_steps=20))
    config.train.update(dict(steps=200, init_from="runs/shapes_stage2_video"))
    config.sample.update(dict(frames=17, height=64, width=64))
    # Sample at the shift this stage trains such clips at: 2 * sqrt(320 / 48) capped at 3.
    config.sample.scheduler.flow_shift = 3.0
    return config
