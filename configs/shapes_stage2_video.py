"""The staged shapes recipe, stage 2 of 3: low-resolution video mixed with images (the clip
shapes of configs/shapes_dit.py), starting from stage 1's weights (configs/shapes_stage1_image.py).
"""

import ml_collections

from . import shapes_dit, shapes_stage1_image


def get_config() -> ml_collections.ConfigDict:
    config = shapes_stage1_image.get_config()
    base = shapes_dit.get_config()
    config.encode.update(dict(shapes=base.encode.shapes, shape_weights=base.encode.shape_weights))
    config.data.frames = base.data.frames
    config.sample.frames = base.sample.frames
    config.sample.scheduler.flow_shift = base.sample.scheduler.flow_shift  # 9 frames train at 2
    config.optim.update(dict(lr=5e-4, warmup_steps=20))
    config.train.update(dict(steps=300, init_from="runs/shapes_stage1_image"))
    # stage 1's latent normalisation: the weights it hands on were trained on those inputs
    config.encode.stats_from = "runs/shapes_stage1_image/latents"
    return config
