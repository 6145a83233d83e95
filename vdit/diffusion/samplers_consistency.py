"""The few-step sampler of a distilled student (`vdit distill`): one model call per step, no
guidance pass (the teacher's guidance is baked into the student).

Convention (flow.py): x_t = (1 - t) x0 + t eps, t = 1 is noise. A consistency student's output F
at (x_t, t) is the average velocity from t down to 0, so its clean estimate is x0 = x_t - t F
(vdit/distill/objective.py's "continuous" and "discrete" methods train this). N steps visit
t_0 = 1 > t_1 > ... > t_{N-1}: the linear grid 1, (N-1)/N, ..., 1/N pushed towards noise by
`flow_shift` (flow.shift_times). After each step but the last, the estimate is re-noised to the
next time:

    x <- (1 - t') x0 + t' (sqrt(1 - gamma) eps_hat + sqrt(gamma) z)

eps_hat = x_t + (1 - t) F is the noise that the estimate implies and z fresh Gaussian noise:
gamma = 1 is the standard multistep consistency sampler, gamma = 0 a deterministic one, an Euler
step x <- x_t - (t - t') F (what the "window" method trains F for: the average velocity across
[t, t']). z is drawn per sample from a key made of that sample's starting noise (its first
value's bits) and the step, so a sample never depends on the batch it runs in.

Config: a scheduler dict {"_class_name": "ConsistencySampler", "flow_shift": s, "gamma": g}
(`config.sample.scheduler` of a distilled run), read by `vdit.diffusion.samplers.make_sampler`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vdit.diffusion.samplers_schedule import check_num_steps, resolve_start, start_step_for_strength

CLASS_NAME = "ConsistencySampler"
KEYS = ("_class_name", "flow_shift", "gamma", "num_train_timesteps")


def parse_consistency_config(cfg: dict) -> ConsistencySampler:
    """A scheduler dict naming `ConsistencySampler` -> the sampler, or an error naming the key."""
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise ValueError(f"scheduler_config for {CLASS_NAME}: unknown key(s) {unknown}; "
                         f"allowed: {list(KEYS[1:])}")
    shift = cfg.get("flow_shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift <= 0:
        raise ValueError(f"scheduler_config for {CLASS_NAME}: flow_shift={shift!r}; expected a "
                         "number > 0")
    gamma = cfg.get("gamma", 1.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"scheduler_config for {CLASS_NAME}: gamma={gamma!r}; expected a number "
                         "in [0, 1] (1: fresh noise each step, 0: deterministic)")
    train = cfg.get("num_train_timesteps", 1000)
    return ConsistencySampler(float(shift), float(gamma), int(train))


def consistency_times(num_steps: int, shift: float) -> np.ndarray:
    """t_0 = 1 > ... > t_{N-1} > 0 [N] float32 (see the module doc)."""
    n = check_num_steps(num_steps)
    t = np.arange(n, 0, -1, dtype=np.float64) / n
    return (shift * t / (1.0 + (shift - 1.0) * t)).astype(np.float32)


def _sample_keys(x: jax.Array) -> jax.Array:
    """One PRNG key per sample from the bits of its first starting-noise value."""
    bits = jax.lax.bitcast_convert_type(x.reshape(x.shape[0], -1)[:, 0], jnp.uint32)
    return jax.vmap(lambda b: jax.random.fold_in(jax.random.key(0), b))(bits)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(velocity_fn, gamma: float, x, times, train_timesteps, args):
    keys = _sample_keys(x)
    nxt = jnp.concatenate([times[1:], jnp.zeros((1,), times.dtype)])

    def body(j, x):
        t, t_next = times[j], nxt[j]
        v = velocity_fn(x, jnp.full((x.shape[0],), t * train_timesteps, jnp.float32), *args)
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {v.shape}; expected the latents' "
                             f"{x.shape}")
        v = v.astype(jnp.float32)
        x0 = x - t * v
        eps = x + (1.0 - t) * v
        if gamma > 0:
            fresh = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), x.shape[1:]))(keys)
            eps = jnp.sqrt(1.0 - gamma) * eps + jnp.sqrt(gamma) * fresh
        return (1.0 - t_next) * x0 + t_next * eps

    return jax.lax.fori_loop(0, times.shape[0], body, x)


@dataclasses.dataclass(frozen=True)
class ConsistencySampler:
    """Few-step consistency sampling; the same surface as `vdit.diffusion.samplers.Sampler`."""

    shift: float
    gamma: float
    num_train_timesteps: int = 1000

    def schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (sigmas [N + 1] float32 ending at 0, model timesteps [N] = 1000 sigma)."""
        times = consistency_times(num_steps, self.shift)
        sigmas = np.concatenate([times, np.zeros((1,), np.float32)])
        return sigmas, times * np.float32(self.num_train_timesteps)

    def start_step(self, num_steps: int, strength: float) -> int:
        return start_step_for_strength(num_steps, strength)

    def add_noise(self, x0, noise, num_steps: int, start_step=None, strength=None) -> jax.Array:
        start = resolve_start(check_num_steps(num_steps), start_step, strength)
        sigma = jnp.float32(self.schedule(num_steps)[0][start])
        return (1.0 - sigma) * jnp.asarray(x0, jnp.float32) + sigma * jnp.asarray(noise, jnp.float32)

    def sample(self, velocity_fn, x, num_steps: int, *args, start_step=None,
               strength=None) -> jax.Array:
        """x [B, ...] at the first step's time -> clean latents, `num_steps - start` model calls.
        velocity_fn(x [B, ...], timesteps [B] in [0, 1000), *args) -> F [B, ...]; hashable."""
        num_steps = check_num_steps(num_steps)
        start = resolve_start(num_steps, start_step, strength)
        x = jnp.asarray(x, jnp.float32)
        try:
            hash(velocity_fn)
        except TypeError as err:
            raise ValueError(f"velocity_fn must be hashable (it keys the compiled loop); got "
                             f"{type(velocity_fn).__name__}") from err
        times = consistency_times(num_steps, self.shift)[start:]
        return _run(velocity_fn, self.gamma, x, jnp.asarray(times),
                    jnp.float32(self.num_train_timesteps), args)
