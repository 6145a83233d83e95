"""Flow samplers against diffusers' schedulers: schedules, whole sampling loops, editing starts,
a single compile per shape, classifier-free guidance batching, and config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from vdit.diffusion.samplers import cfg_velocity, make_sampler

EULER, UNIPC = "FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"
_CLASSES = {EULER: FlowMatchEulerDiscreteScheduler, UNIPC: UniPCMultistepScheduler}
_FLOW = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}

EULER_CONFIGS = {
    "shift1": {"shift": 1.0},
    "shift3": {"shift": 3.0},
    "shift5": {"shift": 5.0},
    "terminal": {"shift": 3.0, "shift_terminal": 0.1},
}
UNIPC_CONFIGS = {
    "shift1": {**_FLOW, "flow_shift": 1.0},
    "shift3": {**_FLOW, "flow_shift": 3.0},
    "shift5": {**_FLOW, "flow_shift": 5.0},
    "order1": {**_FLOW, "flow_shift": 3.0, "solver_order": 1},
    "order3": {**_FLOW, "flow_shift": 5.0, "solver_order": 3},
    "no_lower_final": {**_FLOW, "flow_shift": 3.0, "lower_order_final": False,
                       "final_sigmas_type": "sigma_min"},
    "bh1_order3": {**_FLOW, "flow_shift": 3.0, "solver_order": 3, "solver_type": "bh1",
                   "final_sigmas_type": "sigma_min"},
    "no_corrector_1_2": {**_FLOW, "flow_shift": 3.0, "disable_corrector": [1, 2]},
    "terminal": {**_FLOW, "flow_shift": 3.0, "shift_terminal": 0.05},
}
ALL_CONFIGS = [(EULER, k) for k in EULER_CONFIGS] + [(UNIPC, k) for k in UNIPC_CONFIGS]

# Wan2.1-T2V's diffusers scheduler_config.json, key for key.
WAN_UNIPC = {
    "_class_name": UNIPC, "_diffusers_version": "0.33.0.dev0", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
    "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2",
    "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False,
    "use_flow_sigmas": True, "use_karras_sigmas": False,
}


def _config(name, key):
    return {"_class_name": name, **(EULER_CONFIGS if name == EULER else UNIPC_CONFIGS)[key]}


def _reference(config):
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return _CLASSES[config["_class_name"]](**cfg)


def _noise(shape=(2, 3, 4, 4, 5), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def velocity_jax(x, t):
    """A fixed nonlinear field in (x, t), the same as velocity_torch."""
    s = (t / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.tanh(x) * (1.0 - s) + 0.5 * x * s + 0.2 * jnp.sin(3.0 * s + x)


def velocity_torch(x, t):
    s = (t.float() / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    return torch.tanh(x) * (1.0 - s) + 0.5 * x * s + 0.2 * torch.sin(3.0 * s + x)


def _diffusers_loop(config, x, num_steps, start=0):
    """diffusers' loop as its Wan pipelines run it: set_timesteps, then step per timestep."""
    sched = _reference(config)
    sched.set_timesteps(num_steps)
    x = torch.tensor(x)
    for t in sched.timesteps[start:]:
        x = sched.step(velocity_torch(x, t.expand(x.shape[0])), t, x, return_dict=False)[0]
    return x.numpy()


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("num_steps", [1, 4, 10, 50])
@pytest.mark.parametrize("name,key", ALL_CONFIGS)
def test_schedule_equals_diffusers(name, key, num_steps):
    config = _config(name, key)
    if key == "terminal" and num_steps == 1:   # diffusers divides 0 by 0 here
        with pytest.raises(ValueError, match="shift_terminal=.*num_steps >= 2"):
            make_sampler(config).schedule(num_steps)
        return
    sched = _reference(config)
    sched.set_timesteps(num_steps)
    sigmas, timesteps = make_sampler(config).schedule(num_steps)
    np.testing.assert_array_equal(sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())
    assert sigmas.dtype == np.float32 and timesteps.dtype == sched.timesteps.numpy().dtype


@pytest.mark.parametrize("num_steps", [4, 10])
@pytest.mark.parametrize("name,key", ALL_CONFIGS)
def test_sampling_loop_equals_diffusers(name, key, num_steps):
    config = _config(name, key)
    noise = _noise()
    want = _diffusers_loop(config, noise, num_steps)
    got = make_sampler(config).sample(velocity_jax, jnp.asarray(noise), num_steps)
    assert got.shape == noise.shape and got.dtype == jnp.float32
    assert np.all(np.isfinite(want))
    assert _rel(got, want) < 1e-5


def test_wan_scheduler_config_is_accepted():
    sampler = make_sampler(WAN_UNIPC)
    assert sampler.spec.kind == "unipc" and sampler.spec.shift == 3.0
    noise = _noise(seed=3)
    got = sampler.sample(velocity_jax, noise, 4)
    assert _rel(got, _diffusers_loop(WAN_UNIPC, noise, 4)) < 1e-5


@pytest.mark.parametrize("name,key", [(EULER, "shift3"), (UNIPC, "shift5"), (UNIPC, "order3")])
def test_editing_start_equals_diffusers_video_to_video(name, key):
    """strength as diffusers' Wan video-to-video: get_timesteps, noise at the first kept sigma."""
    config, num_steps, strength = _config(name, key), 10, 0.65
    x0, noise = _noise(seed=1), _noise(seed=2)
    sched = _reference(config)
    sched.set_timesteps(num_steps)
    start = num_steps - min(int(num_steps * strength), num_steps)
    first = sched.timesteps[start:start + 1].repeat(x0.shape[0])
    if name == EULER:
        noised = sched.scale_noise(torch.tensor(x0), first, torch.tensor(noise))
    else:
        noised = sched.add_noise(torch.tensor(x0), torch.tensor(noise), first)
    want = _diffusers_loop(config, noised.numpy(), num_steps, start)

    sampler = make_sampler(config)
    assert sampler.start_step(num_steps, strength) == start == 4
    x = sampler.add_noise(x0, noise, num_steps, strength=strength)
    assert _rel(x, noised.numpy()) < 1e-6
    got = sampler.sample(velocity_jax, x, num_steps, strength=strength)
    assert _rel(got, want) < 1e-5
    same = sampler.sample(velocity_jax, x, num_steps, start_step=start)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(got))


@pytest.mark.parametrize("name,key", [(EULER, "shift3"), (UNIPC, "order3")])
def test_loop_is_traced_once(name, key):
    traces = []

    def velocity(x, t, scale):
        traces.append(x.shape)   # runs only while tracing
        return velocity_jax(x, t) * scale

    sampler = make_sampler(_config(name, key))
    noise = jnp.asarray(_noise())
    a = sampler.sample(velocity, noise, 10, jnp.float32(1.0))
    b = sampler.sample(velocity, noise + 1.0, 10, jnp.float32(0.5))   # new values, same shapes
    assert len(traces) == 1
    assert np.all(np.isfinite(np.asarray(a))) and not np.allclose(a, b)


def _model(x, t, cond):
    """A toy conditional model: the velocity depends on x, t and a per-sample context [B, L, D]."""
    return velocity_jax(x, t) + jnp.mean(cond["context"], axis=(1, 2))[:, None, None, None, None]


def test_cfg_batches_cond_and_uncond_in_one_call():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return _model(x, t, cond)

    x, t = jnp.asarray(_noise()), jnp.full((2,), 700.0)
    cond = {"context": jnp.asarray(_noise((2, 5, 8), seed=4))}
    uncond = {"context": jnp.zeros((2, 5, 8))}
    v = cfg_velocity(model, 5.0)(x, t, cond, uncond)
    assert calls == [4]
    want = _model(x, t, uncond) + 5.0 * (_model(x, t, cond) - _model(x, t, uncond))
    assert _rel(v, want) < 1e-6

    calls.clear()
    v1 = cfg_velocity(model, 1.0)(x, t, cond, None)
    assert calls == [2]
    np.testing.assert_allclose(np.asarray(v1), np.asarray(_model(x, t, cond)), rtol=1e-6)


def test_cfg_inside_sampler_is_compiled_once():
    traces = []

    def model(x, t, cond):
        traces.append(x.shape[0])
        return _model(x, t, cond)

    sampler = make_sampler(WAN_UNIPC)
    cond = {"context": jnp.asarray(_noise((2, 5, 8), seed=5))}
    uncond = {"context": jnp.zeros((2, 5, 8))}
    noise = jnp.asarray(_noise())
    got = sampler.sample(cfg_velocity(model, 4.0), noise, 6, cond, uncond)
    sampler.sample(cfg_velocity(model, 4.0), noise, 6, uncond, cond)   # equal wrapper: cached
    assert traces == [4]

    def guided(x, t):   # the same guidance, written out with two model calls
        vc, vu = _model(x, t, cond), _model(x, t, uncond)
        return vu + 4.0 * (vc - vu)

    assert _rel(got, sampler.sample(guided, noise, 6)) < 1e-6


@pytest.mark.parametrize("config,match", [
    ({"_class_name": "DDIMScheduler"}, "_class_name"),
    ({"_class_name": EULER, "shfit": 3.0}, "unknown key.*shfit"),
    ({"_class_name": EULER, "use_karras_sigmas": True}, "use_karras_sigmas=True"),
    ({"_class_name": EULER, "stochastic_sampling": True}, "stochastic_sampling"),
    ({"_class_name": EULER, "shift": -1.0}, "shift=-1.0"),
    ({"_class_name": UNIPC, "use_flow_sigmas": True}, "prediction_type='epsilon'"),
    ({"_class_name": UNIPC, "prediction_type": "flow_prediction"}, "use_flow_sigmas=False"),
    ({**WAN_UNIPC, "use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({**WAN_UNIPC, "solver_type": "bh3"}, "solver_type='bh3'"),
    ({**WAN_UNIPC, "solver_order": 0}, "solver_order=0"),
    ({**WAN_UNIPC, "solver_type": "bh1"}, "bh1.*non-finite"),
    ({**WAN_UNIPC, "lower_order_final": False}, "lower_order_final=false"),
    ({**WAN_UNIPC, "disable_corrector": "1"}, "disable_corrector"),
    ({**WAN_UNIPC, "shift_terminal": 1.5}, "shift_terminal=1.5"),
])
def test_bad_scheduler_config_is_named(config, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(config)


@dataclasses.dataclass
class _Unhashable:   # eq=True without frozen: __hash__ is None
    def __call__(self, x, t):
        return velocity_jax(x, t)


def test_bad_sampling_arguments_are_named():
    sampler, noise = make_sampler(WAN_UNIPC), jnp.asarray(_noise())
    with pytest.raises(ValueError, match="num_steps=0"):
        sampler.sample(velocity_jax, noise, 0)
    with pytest.raises(ValueError, match="start_step=4"):
        sampler.sample(velocity_jax, noise, 4, start_step=4)
    with pytest.raises(ValueError, match="not both"):
        sampler.sample(velocity_jax, noise, 4, start_step=1, strength=0.5)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        sampler.sample(velocity_jax, noise, 4, strength=0.2)
    with pytest.raises(ValueError, match="strength=1.5"):
        sampler.start_step(4, 1.5)
    with pytest.raises(ValueError, match="expected the latents"):
        sampler.sample(lambda x, t: x[:, :1], noise, 2)
    with pytest.raises(ValueError, match="guidance=nan"):
        cfg_velocity(_model, float("nan"))
    with pytest.raises(ValueError, match="unconditional"):
        cfg_velocity(_model, 3.0)(noise, jnp.zeros(2), {"context": jnp.zeros((2, 1, 1))})
    with pytest.raises(ValueError, match="hashable"):
        sampler.sample(_Unhashable(), noise, 2)
    with pytest.raises(TypeError, match="must be a dict"):
        make_sampler([("_class_name", UNIPC)])


def test_samples_under_an_outer_jit():
    """sample is a pure function: it also runs inside a caller's jit (e.g. a Generator's)."""
    sampler = make_sampler(_config(EULER, "shift5"))
    noise = jnp.asarray(_noise())
    outer = jax.jit(lambda n: sampler.sample(velocity_jax, n, 4))
    want = _diffusers_loop(_config(EULER, "shift5"), np.asarray(noise), 4)
    assert _rel(outer(noise), want) < 1e-5
