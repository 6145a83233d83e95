"""Wan2.1 T2V 1.3B training, stage 2 of 3: low-resolution video (17 and 33 frames at 256 px)
mixed with images, starting from stage 1's weights (see configs/stage1_image.py).

    vdit encode --config configs/stage2_video.py --workdir runs/stage2_video
    vdit train  --config configs/stage2_video.py --workdir runs/stage2_video \
        --config.train.init_from=runs/stage1_image      # the default; any run or step folder
"""

import ml_collections

from . import stage1_image


def get_config() -> ml_collections.ConfigDict:
    config = stage1_image.get_config()
    # 33 frames -> 9 latent frames x 256 = 2304 tokens; images keep the text-image skill.
    config.encode.update(dict(shapes=[(33, 256, 256), (17, 256, 256), (1, 256, 256)],
                              shape_weights=[0.4, 0.3, 0.3]))
    config.data.update(dict(frames=33, rows_per_batch=128, max_segments=8, pack_bins=8))
    config.optim.update(dict(lr=5e-5, warmup_steps=500))
    config.train.update(dict(steps=30_000, init_from="runs/stage1_image"))
    config.sample.frames = 33
    return config
