"""The training rules of a config, checked in one place: `train.init_from` (its weights choice),
LoRA, image-to-video conditioning (with the Wan2.1 image branch and Wan2.2 TI2V), Wan2.2 experts,
a step count that is whole optimizer updates under gradient accumulation.

`vdit train` runs them when the recipe loads (vdit/cli_checks.py), the loop and the dry run when
they start, so a library caller gets the same errors. `vdit.config.validate` has checked the keys
every command shares (mesh, attention backend, remat policy, dtypes, shapes) before; each rule lives
with the code it configures and raises a ConfigError/ValueError naming the key.
"""

from __future__ import annotations

from vdit.config import ConfigError
from vdit.models import lora
from vdit.models.attention import resolve_backend
from vdit.train import conditioning, experts, init_from


def check_train_config(config, dit):
    """Checks `config`'s training rules for the DiT `dit` (`build_dit(config.model)`); returns the
    config with `train.init_from` made absolute (`init_from.checked`)."""
    config = init_from.checked(config)
    lora.check_config(config)
    conditioning.check_config(config, dit)
    experts.check_config(config)
    check_accumulation(config)
    return config


def check_accumulation(config, steps_key: str = "train.steps") -> None:
    """`steps_key` counts micro-batches (vdit/train/optim.py), and an update needs
    `optim.grad_accum` of them: a remainder would be trained on and then never applied, the run
    ending on a half-filled accumulator. A ConfigError naming both keys and the nearest counts."""
    section, key = steps_key.split(".")
    steps, every = int(config[section][key]), int(config.optim.get("grad_accum", 1) or 1)
    if every > 1 and steps % every:
        down, up = steps - steps % every, steps - steps % every + every
        raise ConfigError(
            f"config key {steps_key!r} = {steps} is not a multiple of 'optim.grad_accum' = "
            f"{every}: {steps_key} counts micro-batches and an update takes {every} of them, so "
            f"the last {steps % every} would be computed and never applied; set {steps_key} to "
            f"{up}" + (f" or {down}" if down else "") + ", or change optim.grad_accum")


def check_attention_here(dit) -> None:
    """The DiT's attention kernel runs on this machine: a TPU/GPU kernel named on a CPU host is an
    error naming config.model.attention at start-up, not while tracing the model (a dry run
    compiles XLA's attention instead, `vdit.train.dry_run.attention_here`)."""
    try:
        resolve_backend(dit.attention)
    except RuntimeError as e:
        raise ConfigError(str(e)) from e
