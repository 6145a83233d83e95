"""The training rules of a config, checked in one place: `train.init_from` (its weights choice),
LoRA, image-to-video conditioning (with the Wan2.1 image branch and Wan2.2 TI2V), Wan2.2 experts.

`vdit train` runs them when the recipe loads (vdit/cli_checks.py), the loop and the dry run when
they start, so a library caller gets the same errors. `vdit.config.validate` has checked the keys
every command shares (mesh, attention backend, remat policy, dtypes, shapes) before; each rule lives
with the code it configures and raises a ConfigError/ValueError naming the key.
"""

from __future__ import annotations

from vdit.models import lora
from vdit.train import conditioning, experts, init_from


def check_train_config(config, dit):
    """Checks `config`'s training rules for the DiT `dit` (`build_dit(config.model)`); returns the
    config with `train.init_from` made absolute (`init_from.checked`)."""
    config = init_from.checked(config)
    lora.check_config(config)
    conditioning.check_config(config, dit)
    experts.check_config(config)
    return config
