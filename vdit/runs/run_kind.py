"""What a run folder holds, read from its weights: a VAE run (`vdit train-vae`) or a DiT run
(`vdit train`, export, convert). Loading one where the other is expected fails here, naming the
folder and the command that makes the right kind, not deep inside a model with mismatched weights."""

from __future__ import annotations

from collections.abc import Mapping

KINDS = {"vae": "a VAE run (made by `vdit train-vae`)",
         "dit": "a DiT run (made by `vdit train`, `vdit export` or `vdit convert`)"}
# a DiT run's trainable weights hold one of these ("dit_2", "lora_2": a Wan2.2 low-noise expert)
DIT_PARTS = ("dit", "lora", "dit_2", "lora_2")


def kind_of(params: Mapping, saved: Mapping) -> str:
    """"vae", "dit" or "unknown" from a run's restored weights and saved config dict."""
    if any(part in params for part in DIT_PARTS):
        return "dit"
    if "vae" in saved:
        return "vae"
    return "unknown"


def check_kind(params: Mapping, saved: Mapping, want: str, path: str, what: str) -> None:
    """Raises ValueError unless the run at `path` (given as `what`) is of kind `want`."""
    kind = kind_of(params, saved)
    if kind != want:
        got = KINDS.get(kind, f"a run of an unknown kind (weights {sorted(params)[:6]})")
        raise ValueError(f"{what} {path!r} is {got}, but {KINDS[want]} is needed here")
