"""The sigma and timestep arrays of a flow sampler for N inference steps, as diffusers builds them.

Owns the numbers only (numpy, host side): sigmas [N + 1] float32 from noise (about 1) down to the
final sigma (0, or the last sigma for UniPC's final_sigmas_type="sigma_min"), and the timesteps [N]
the model is called with (1000 sigma; UniPC truncates them to integers like diffusers). The
arithmetic follows diffusers' dtypes step by step (float32 where it uses torch, float64 where it
uses numpy), so both arrays equal diffusers' bit for bit.
"""

from __future__ import annotations

import numpy as np

from vdit.diffusion.samplers_config import SamplerSpec


def _shift64(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def _shift32(sigma: np.float32, shift: float) -> np.float32:
    """The time shift in float32 arithmetic, as diffusers' Euler constructor applies it (torch)."""
    return (np.float32(shift) * sigma) / (np.float32(1.0) + np.float32(shift - 1.0) * sigma)


def _stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """Rescales 1 - sigma so that the last sigma becomes `terminal` (LTX-Video's schedule end)."""
    one_minus = 1.0 - sigmas
    if one_minus[-1] <= 0:
        raise ValueError(f"shift_terminal={terminal} needs a schedule whose last sigma is below 1 "
                         f"(num_steps >= 2); got {len(sigmas)} step(s)")
    scale = one_minus[-1] / (1.0 - terminal)
    return 1.0 - one_minus / scale


def _euler_schedule(spec: SamplerSpec, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    train = spec.num_train_timesteps
    # The training grid's ends, shifted once in float32 by the constructor...
    sigma_max = float(_shift32(np.float32(train) / np.float32(train), spec.shift))
    sigma_min = float(_shift32(np.float32(1.0) / np.float32(train), spec.shift))
    # ...then spaced linearly and shifted again in float64 (diffusers shifts twice).
    times = np.linspace(sigma_max * train, sigma_min * train, num_steps)
    sigmas = _shift64(times / train, spec.shift)
    if spec.shift_terminal is not None:
        sigmas = _stretch_to_terminal(sigmas, spec.shift_terminal)
    sigmas = sigmas.astype(np.float32)
    timesteps = sigmas * np.float32(train)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


def _unipc_schedule(spec: SamplerSpec, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    train = spec.num_train_timesteps
    sigmas = _shift64(np.linspace(1.0, 1.0 / train, num_steps + 1)[:-1], spec.shift)
    if spec.shift_terminal is not None:
        sigmas = _stretch_to_terminal(sigmas, spec.shift_terminal)
    if abs(sigmas[0] - 1.0) < 1e-6:
        sigmas[0] -= 1e-6   # keeps log(1 - sigma) finite in the multistep update
    timesteps = (sigmas * train).astype(np.int64)
    last = sigmas[-1] if spec.final_sigmas_type == "sigma_min" else 0.0
    return np.concatenate([sigmas, [last]]).astype(np.float32), timesteps


def check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}; expected an integer >= 1")
    return int(num_steps)


def flow_schedule(spec: SamplerSpec, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (sigmas [N + 1] float32, timesteps [N]: float32 for Euler, int64 for UniPC)."""
    num_steps = check_num_steps(num_steps)
    if spec.kind == "euler":
        return _euler_schedule(spec, num_steps)
    if spec.kind == "unipc":
        return _unipc_schedule(spec, num_steps)
    raise ValueError(f"sampler kind={spec.kind!r}; expected 'euler' or 'unipc'")


def start_step_for_strength(num_steps: int, strength: float) -> int:
    """First step index for SDEdit-style editing, as diffusers' `get_timesteps` picks it.

    strength 1.0 runs every step (start 0); smaller strengths skip the noisiest steps.
    """
    num_steps = check_num_steps(num_steps)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            0 < strength <= 1):
        raise ValueError(f"strength={strength!r}; expected a number in (0, 1]")
    kept = min(int(num_steps * strength), num_steps)
    if kept == 0:
        raise ValueError(f"strength={strength} with num_steps={num_steps} leaves no denoising "
                         f"step; use strength >= {1.0 / num_steps:.4g}")
    return num_steps - kept


def resolve_start(num_steps: int, start_step, strength) -> int:
    """The first step index run: from `strength` (SDEdit-style) or `start_step`, not both."""
    if strength is not None:
        if start_step is not None:
            raise ValueError(f"give start_step ({start_step}) or strength ({strength}), not both")
        return start_step_for_strength(num_steps, strength)
    start = 0 if start_step is None else start_step
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not (
            0 <= start < num_steps):
        raise ValueError(f"start_step={start!r}; expected an integer in [0, {num_steps})")
    return int(start)
