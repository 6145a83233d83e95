"""LoRA finetuning of a trained shapes DiT (configs/shapes_dit.py): low-rank adapters on the
attention and FFN projections train, the base run's weights stay frozen and untouched.

    vdit train  --config configs/shapes_lora.py --workdir runs/lora \
        --config.train.init_from=runs/dit               # the base run (the default)
    vdit sample --workdir runs/lora --prompt "a red circle moving right" --out lora.mp4
    vdit export --workdir runs/lora --out runs/lora_merged   # merged, standalone weights

By default it trains on the base run's latents (same normalisation statistics); point
`data.latents_dir` at another encoded set to finetune on it.
"""

import ml_collections

from . import common, shapes_dit


def get_config() -> ml_collections.ConfigDict:
    config = shapes_dit.get_config()
    config.lora = common.lora()
    config.lora.update(dict(enabled=True, rank=8, alpha=8.0))
    config.text.trainable = False  # under LoRA only the adapters train
    config.train.update(dict(steps=200, init_from="runs/dit"))
    config.data.latents_dir = "runs/dit/latents"
    config.optim.update(dict(lr=1e-3, warmup_steps=20))
    return config
