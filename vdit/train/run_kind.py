"""What a run folder holds, read from its saved config: a VAE run (`vdit train-vae`) or a DiT run
(`vdit train`, export, convert). Loading one where the other is expected fails here, naming the
folder and the command that makes the right kind, not deep inside a model with mismatched weights."""

from __future__ import annotations

KINDS = {"vae": "a VAE run (made by `vdit train-vae`)",
         "dit": "a DiT run (made by `vdit train`, `vdit export` or `vdit convert`)"}


def kind_of(saved: dict) -> str:
    """"vae", "dit" or "unknown" for a run's saved config dict."""
    if "vae" in saved and "model" not in saved:
        return "vae"
    if "model" in saved:
        return "dit"
    return "unknown"


def check_kind(saved: dict, want: str, path: str, what: str) -> None:
    """Raises ValueError unless the run at `path` (given as `what`) is of kind `want`."""
    kind = kind_of(saved)
    if kind != want:
        got = KINDS.get(kind, "a run of an unknown kind (its config has sections "
                              f"{sorted(saved)})")
        raise ValueError(f"{what} {path!r} is {got}, but {KINDS[want]} is needed here")
