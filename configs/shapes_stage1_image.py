"""The staged recipe on the synthetic shapes world, stage 1 of 3: images only (T = 1).

The toy version of configs/stage1_image.py (same three stages, CPU sizes), derived from
configs/shapes_dit.py; `encode.shapes` sets each stage's durations and sizes. Each stage has its
own workdir (and latents), and each later stage starts from the previous one's weights through
`train.init_from`, set by convention to runs/<previous stage> (--config.train.init_from=PATH):

    vdit encode --config configs/shapes_stage1_image.py --workdir runs/shapes_stage1_image
    vdit train  --config configs/shapes_stage1_image.py --workdir runs/shapes_stage1_image
    vdit encode --config configs/shapes_stage2_video.py --workdir runs/shapes_stage2_video
    vdit train  --config configs/shapes_stage2_video.py --workdir runs/shapes_stage2_video
    vdit encode --config configs/shapes_stage3_hq.py    --workdir runs/shapes_stage3_hq
    vdit train  --config configs/shapes_stage3_hq.py    --workdir runs/shapes_stage3_hq

Stage 1 trains only the DiT, from scratch. The text encoder is shapes_dit's word-level one,
frozen at its random init (text.trainable=False): checkpoints leave it out, stage 1 recreates it
from train.seed and later stages take it from their train.init_from run. The VAE
(encode.vae_workdir) is frozen throughout too: it only encodes the clips.
"""

import ml_collections

from . import common, shapes_dit


def get_config() -> ml_collections.ConfigDict:
    config = shapes_dit.get_config()
    config.encode.update(dict(shapes=[(1, 48, 48), (1, 48, 64), (1, 64, 48)],
                              shape_weights=[0.6, 0.2, 0.2]))
    config.data.frames = 1
    config.sample.frames = 1
    # Sample at the shift a 32x32 image trains at: 2 * sqrt(16 tokens / 48).
    config.sample.scheduler.flow_shift = 1.15
    config.train.steps = 200
    config.lora = common.lora()  # off; --config.lora.enabled=True finetunes adapters instead
    return config
