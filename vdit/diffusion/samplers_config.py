"""Reading a diffusers `scheduler_config.json` dict into a validated, hashable sampler spec.

Owns which diffusers scheduler options vdit's flow samplers support. Keys follow diffusers'
`FlowMatchEulerDiscreteScheduler` and `UniPCMultistepScheduler` constructors; a missing key takes
diffusers' default. Keys that only matter for VP (beta) schedules or for options left off are
accepted and ignored; an option set to something the samplers do not implement, or a key neither
scheduler knows, is an error naming the key, its value and what is supported. So are UniPC
settings whose last step diffusers computes as inf/nan. (UniPC's final_sigmas_type="sigma_min"
repeats the last sigma, so over flow sigmas its last step leaves the sample unchanged, as in
diffusers.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

EULER = "FlowMatchEulerDiscreteScheduler"
UNIPC = "UniPCMultistepScheduler"

# Keys that do not change a flow-sigma sampler's numbers (beta schedules, thresholding knobs and
# dynamic-shift parameters while those features are off, karras sigma limits).
_EULER_IGNORED = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
                  "time_shift_type")
_UNIPC_IGNORED = ("beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "dynamic_thresholding_ratio", "sample_max_value", "steps_offset",
                  "rescale_betas_zero_snr", "time_shift_type", "sigma_min", "sigma_max")

# key -> (diffusers default, the only supported value), for options vdit leaves unimplemented.
_EULER_FIXED = {
    "use_dynamic_shifting": (False, False),
    "invert_sigmas": (False, False),
    "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False),
    "use_beta_sigmas": (False, False),
    "stochastic_sampling": (False, False),
}
_UNIPC_FIXED = {
    "prediction_type": ("epsilon", "flow_prediction"),
    "use_flow_sigmas": (False, True),
    "predict_x0": (True, True),
    "thresholding": (False, False),
    "solver_p": (None, None),
    "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False),
    "use_beta_sigmas": (False, False),
    "use_dynamic_shifting": (False, False),
}
_EULER_USED = {"num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None}
_UNIPC_USED = {"num_train_timesteps": 1000, "flow_shift": 1.0, "shift_terminal": None,
               "solver_order": 2, "solver_type": "bh2", "lower_order_final": True,
               "disable_corrector": [], "final_sigmas_type": "zero",
               "timestep_spacing": "linspace"}
# diffusers maps these legacy UniPC solver types to bh2.
_SOLVER_TYPE_ALIASES = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2",
                        "logrho": "bh2"}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Everything that decides a flow sampler's schedule and update rule.

    kind: "euler" or "unipc". shift: the flow shift (diffusers' `shift` / `flow_shift`).
    The UniPC fields are ignored for Euler.
    """

    kind: str
    num_train_timesteps: int = 1000
    shift: float = 1.0
    shift_terminal: float | None = None
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    final_sigmas_type: str = "zero"


def _check_keys(cfg: dict, name: str, known: set[str]) -> None:
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"scheduler_config for {name}: unknown key(s) {unknown}; "
                         f"known keys: {sorted(known)}")


def _check_fixed(cfg: dict, name: str, fixed: dict[str, tuple[Any, Any]]) -> None:
    for key, (default, supported) in fixed.items():
        value = cfg.get(key, default)
        if value != supported:
            raise ValueError(f"scheduler_config for {name}: {key}={value!r} is not supported by "
                             f"vdit's samplers (supported: {key}={supported!r})")


def _positive_int(cfg: dict, key: str, default: int, name: str) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"scheduler_config for {name}: {key}={value!r}; expected an integer >= 1")
    return value


def _shift_value(cfg: dict, key: str, name: str) -> float:
    value = cfg.get(key, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"scheduler_config for {name}: {key}={value!r}; expected a number > 0")
    return float(value)


def _shift_terminal(cfg: dict, name: str) -> float | None:
    value = cfg.get("shift_terminal")
    if value is None or value == 0:   # diffusers treats a falsy shift_terminal as off
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"scheduler_config for {name}: shift_terminal={value!r}; "
                         "expected null or a number in (0, 1)")
    return float(value)


def _euler_spec(cfg: dict) -> SamplerSpec:
    _check_keys(cfg, EULER, set(_EULER_IGNORED) | set(_EULER_FIXED) | set(_EULER_USED))
    _check_fixed(cfg, EULER, _EULER_FIXED)
    return SamplerSpec(kind="euler",
                       num_train_timesteps=_positive_int(cfg, "num_train_timesteps", 1000, EULER),
                       shift=_shift_value(cfg, "shift", EULER),
                       shift_terminal=_shift_terminal(cfg, EULER))


def _choice(cfg: dict, key: str, allowed: tuple, name: str):
    value = cfg.get(key, _UNIPC_USED[key])
    if value not in allowed:
        raise ValueError(f"scheduler_config for {name}: {key}={value!r}; allowed: {list(allowed)}")
    return value


def _unipc_spec(cfg: dict) -> SamplerSpec:
    _check_keys(cfg, UNIPC, set(_UNIPC_IGNORED) | set(_UNIPC_FIXED) | set(_UNIPC_USED))
    _check_fixed(cfg, UNIPC, _UNIPC_FIXED)
    _choice(cfg, "timestep_spacing", ("linspace", "leading", "trailing"), UNIPC)
    solver_type = _SOLVER_TYPE_ALIASES[_choice(cfg, "solver_type", tuple(_SOLVER_TYPE_ALIASES),
                                               UNIPC)]
    final = _choice(cfg, "final_sigmas_type", ("zero", "sigma_min"), UNIPC)
    lower_order_final = _choice(cfg, "lower_order_final", (True, False), UNIPC)
    order = _positive_int(cfg, "solver_order", 2, UNIPC)
    disable = cfg.get("disable_corrector", [])
    if not isinstance(disable, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in disable):
        raise ValueError(f"scheduler_config for {UNIPC}: disable_corrector={disable!r}; "
                         "expected a list of step indices")
    if final == "zero" and solver_type == "bh1":
        # B(h) = h is infinite at sigma = 0, and diffusers' last step turns into nan.
        raise ValueError(f"scheduler_config for {UNIPC}: solver_type='bh1' with "
                         "final_sigmas_type='zero' makes the last step non-finite; use "
                         "solver_type='bh2' or final_sigmas_type='sigma_min'")
    if not lower_order_final and (order > 2 or (order == 2 and final == "zero")):
        # A full-order last step divides by an infinite log-SNR gap (final sigma 0) or solves a
        # singular system (final sigma repeated): diffusers returns inf/nan there.
        raise ValueError(f"scheduler_config for {UNIPC}: solver_order={order} with "
                         f"lower_order_final=false and final_sigmas_type={final!r} makes the last "
                         "step non-finite; set lower_order_final=true (or use solver_order=2 with "
                         "final_sigmas_type='sigma_min')")
    return SamplerSpec(kind="unipc",
                       num_train_timesteps=_positive_int(cfg, "num_train_timesteps", 1000, UNIPC),
                       shift=_shift_value(cfg, "flow_shift", UNIPC),
                       shift_terminal=_shift_terminal(cfg, UNIPC), solver_order=order,
                       solver_type=solver_type, lower_order_final=bool(lower_order_final),
                       disable_corrector=tuple(sorted(set(disable))), final_sigmas_type=final)


def parse_scheduler_config(cfg: dict) -> SamplerSpec:
    """A diffusers scheduler_config dict (with `_class_name`) -> SamplerSpec, or a clear error."""
    if not isinstance(cfg, dict):
        raise TypeError(f"scheduler_config must be a dict, got {type(cfg).__name__}")
    name = cfg.get("_class_name")
    if name == EULER:
        return _euler_spec(cfg)
    if name == UNIPC:
        return _unipc_spec(cfg)
    raise ValueError(f"scheduler_config '_class_name'={name!r} is not supported; "
                     f"expected {EULER!r} or {UNIPC!r}")
