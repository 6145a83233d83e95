"""Two experts on the shapes world (Wan2.2 A14B's layout at toy size): derived from
configs/shapes_dit.py by adding an `experts` section.

A high-noise DiT ("dit") and a low-noise one ("dit_2"), each of shapes_dit's size, switched at
`experts.boundary_ratio` = 0.8 of the 1000 timesteps (shifted flow time t >= 0.8: the high-noise
expert); `experts.train` = "both" trains them in one run, half of each batch's rows per expert, so
a step costs what a shapes_dit step costs (vdit/train/experts.py). "high" or "low" trains one of
them with the other frozen (from `train.init_from`). `vdit sample` / `vdit eval shapes` on the run
denoise with both, by timestep.

    vdit encode --config configs/shapes_moe.py --workdir runs/moe \
        --config.encode.vae_workdir=runs/vae
    vdit train  --config configs/shapes_moe.py --workdir runs/moe
    vdit eval shapes --workdir runs/moe
"""

import ml_collections

from . import shapes_dit


def get_config() -> ml_collections.ConfigDict:
    config = shapes_dit.get_config()
    config.experts = ml_collections.ConfigDict(dict(boundary_ratio=0.8, train="both"))
    return config
