"""Wan2.2 two-expert (A14B) training: each expert trains on its own share of the timesteps.

A config with an `experts` section holds two DiTs of one `model` section: "dit", the high-noise
expert, and "dit_2", the low-noise one (the names `vdit convert` and `Generator` use). Sampling
runs "dit" at steps whose timestep is >= boundary_ratio * 1000 and "dit_2" below it
(`vdit.pipelines.guided_dit.TwoExperts`); the timestep the model sees is 1000 t of the shifted
flow time t (vdit/diffusion/flow.py), in training as in sampling. So the high-noise expert trains
on shifted t in [boundary_ratio, 1) and the low-noise one on [0, boundary_ratio): the flow time
sampler truncated to that range (`flow.sample_segment_times(..., t_range=)`), which keeps each
segment's own resolution shift.

Config section `experts`:
  boundary_ratio  the switch point in (0, 1) (Wan2.2: 0.875 T2V, 0.9 I2V)
  train           which expert(s) this run trains (default "both"):
    "high"  only "dit" (high-noise) trains; "dit_2" is frozen, carried unchanged
    "low"   only "dit_2" (low-noise) trains; "dit" is frozen, carried unchanged
    "both"  both train in one run: the first half of each batch's rows trains "dit", the second
            half "dit_2" (rows are packed from shuffled clips, so the halves are alike); the step
            costs what one expert's step on the whole batch costs, and the loss is the mean of the
            two experts' losses (logged apart as loss_high / loss_low). Needs an even
            data.rows_per_batch.
A frozen expert lives with the other frozen weights (from `train.init_from`, else the seed), as
LoRA's base does; the checkpoint holds the trained expert(s), and `init_from.run_weights` (what
`vdit sample`, `vdit export` and a following run read) returns both. Under LoRA (`config.lora`)
adapters train for the chosen expert(s): "lora" on "dit", "lora_2" on "dit_2".
"""

from __future__ import annotations

import jax

from vdit.config import ConfigError
from vdit.models import lora
from vdit.train.objective import make_dit_loss

TRAIN_CHOICES = ("both", "high", "low")
DIT_KEY = {"high": "dit", "low": "dit_2"}     # each expert's weights in a run
LORA_KEY = {"high": "lora", "low": "lora_2"}  # its adapters under LoRA


def enabled(config) -> bool:
    return "experts" in config


def trained(config) -> tuple[str, ...]:
    """The experts this run trains: ("high",), ("low",) or ("high", "low"); ("high",) for a
    one-DiT run (its "dit" plays the high expert's part over the whole time range)."""
    if not enabled(config):
        return ("high",)
    choice = config.experts.get("train", "both")
    return ("high", "low") if choice == "both" else (choice,)


def check_config(config) -> None:
    """Start-up checks of the `experts` section; errors name the key."""
    if not enabled(config):
        return
    ratio = config.experts.get("boundary_ratio", None)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
        raise ConfigError(f"config key 'experts.boundary_ratio' = {ratio!r}: expected a number in "
                          "(0, 1), the fraction of the 1000 timesteps where the low-noise expert "
                          "takes over")
    choice = config.experts.get("train", "both")
    if choice not in TRAIN_CHOICES:
        raise ConfigError(f"config key 'experts.train' = {choice!r}; allowed: {list(TRAIN_CHOICES)}")
    unknown = sorted(set(config.experts.keys()) - {"boundary_ratio", "train"})
    if unknown:
        raise ConfigError(f"unknown config keys in 'experts': {unknown}; known: "
                          "['boundary_ratio', 'train']")
    rows = int(config.data.rows_per_batch) if "data" in config else 0
    if choice == "both" and rows % 2:
        raise ConfigError(f"config key 'data.rows_per_batch' = {rows}: experts.train='both' "
                          "gives half of each batch's rows to each expert, so it must be even")


def t_range(config, expert: str) -> tuple[float, float] | None:
    """The shifted flow times [lo, hi) `expert` trains on; None (all) for a one-DiT run."""
    if not enabled(config):
        return None
    ratio = float(config.experts.boundary_ratio)
    return (ratio, 1.0) if expert == "high" else (0.0, ratio)


def part_names(config) -> list[str]:
    """Every weight group of a run of `config`: "dit", "text", and "dit_2" / LoRA adapters."""
    names = ["dit", "text"] + (["dit_2"] if enabled(config) else [])
    if lora.enabled(config):
        names += [LORA_KEY[e] for e in trained(config)]
    return names


def trainable_names(config) -> list[str]:
    """The weight groups that train: the chosen experts' DiTs (or their adapters under LoRA),
    plus the text encoder when config.text.trainable and LoRA is off."""
    if lora.enabled(config):
        return [LORA_KEY[e] for e in trained(config)]
    text = ["text"] if config.text.get("trainable", False) else []
    return [DIT_KEY[e] for e in trained(config)] + text


def make_loss(dit, text_model, config):
    """loss_fn(params, frozen, batch, rng) -> (loss, aux) of `vdit train` (before LoRA's
    wrapping): one DiT over all times, one expert over its range, or both (see module doc)."""
    experts = trained(config)
    losses = {e: make_dit_loss(dit, text_model, config, DIT_KEY[e], t_range(config, e))
              for e in experts}
    if len(experts) == 1:
        return losses[experts[0]]

    def both(params, frozen, batch, rng):
        half = batch["segment_ids"].shape[0] // 2
        parts = {"high": jax.tree.map(lambda x: x[:half], batch),
                 "low": jax.tree.map(lambda x: x[half:], batch)}
        out = {e: losses[e](params, frozen, parts[e], jax.random.fold_in(rng, i))
               for i, e in enumerate(experts)}
        loss = 0.5 * (out["high"][0] + out["low"][0])
        return loss, {"tokens": out["high"][1]["tokens"] + out["low"][1]["tokens"],
                      "loss_high": out["high"][0], "loss_low": out["low"][0]}

    return both
