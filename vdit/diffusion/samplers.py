"""Flow-matching samplers (Euler and UniPC, as diffusers' schedulers) and classifier-free guidance.

Convention (see flow.py): sigma = t in [0, 1], t = 1 is noise; the model maps
(x [B, ...], timesteps [B] in [0, 1000)) to a velocity v = noise - data of x's shape.

    sampler = make_sampler(json.load(open("scheduler/scheduler_config.json")))
    latents = sampler.sample(velocity_fn, noise, num_steps, *args)

`velocity_fn(x, timesteps, *args) -> v` is called once per step inside one compiled
`lax.fori_loop`; `args` (parameters, text embeddings) are traced arguments, never baked-in
constants. The loop is compiled once per (velocity_fn, sampler kind, shapes, num_steps): pass the
same velocity_fn object every call (a module-level function, a bound method or a `CFGVelocity`
with the same model_fn), not a fresh lambda. Latents are carried in float32 whatever v's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np

from vdit.diffusion import samplers_unipc
from vdit.diffusion.samplers_config import SamplerSpec, parse_scheduler_config
from vdit.diffusion.samplers_consistency import CLASS_NAME as CONSISTENCY
from vdit.diffusion.samplers_consistency import ConsistencySampler, parse_consistency_config
from vdit.diffusion.samplers_schedule import (
    check_num_steps,
    flow_schedule,
    resolve_start,
    start_step_for_strength,
)

VelocityFn = Callable[..., jax.Array]


def _euler_update(x, v, tab):
    return x + tab["dt"] * v


def _step_velocity(velocity_fn, x, t, args):
    timesteps = jnp.full((x.shape[0],), t, jnp.float32)
    v = velocity_fn(x, timesteps, *args)
    if v.shape != x.shape:
        raise ValueError(f"velocity_fn returned shape {v.shape}; expected the latents' {x.shape}")
    return v.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run(velocity_fn, kind: str, solver_order: int, x, timesteps, tables, args):
    """The whole sampling loop; timesteps [M] and every tables[key] [M, ...] index by step."""
    if kind == "euler":
        init, update = x, _euler_update
    else:
        init, update = samplers_unipc.unipc_init(x, solver_order), samplers_unipc.unipc_update

    def body(j, carry):
        sample = carry if kind == "euler" else carry[0]
        v = _step_velocity(velocity_fn, sample, timesteps[j], args)
        return update(carry, v, {key: value[j] for key, value in tables.items()})

    carry = jax.lax.fori_loop(0, timesteps.shape[0], body, init)
    return carry if kind == "euler" else carry[0]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A flow ODE solver with its diffusers-equivalent schedule; build it with `make_sampler`."""

    spec: SamplerSpec

    def schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (sigmas [N + 1] float32, timesteps [N]): diffusers' after set_timesteps(N)."""
        return flow_schedule(self.spec, num_steps)

    def start_step(self, num_steps: int, strength: float) -> int:
        """First step index for editing with `strength` (diffusers' get_timesteps)."""
        return start_step_for_strength(num_steps, strength)

    def add_noise(self, x0: jax.Array, noise: jax.Array, num_steps: int, start_step=None,
                  strength=None) -> jax.Array:
        """Noises clean latents to the sigma of the first step run: (1 - s) x0 + s noise."""
        start = resolve_start(check_num_steps(num_steps), start_step, strength)
        sigma = jnp.float32(self.schedule(num_steps)[0][start])
        return (1.0 - sigma) * x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)

    def tables(self, num_steps: int, start: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per-step model timesteps [M] float32 and update coefficients for steps start..N-1."""
        sigmas, timesteps = self.schedule(num_steps)
        if self.spec.kind == "euler":
            tables = {"dt": sigmas[start + 1:] - sigmas[start:-1]}   # float32, as diffusers
        else:
            tables = samplers_unipc.unipc_tables(self.spec, sigmas, start)
        return timesteps[start:].astype(np.float32), tables

    def sample(self, velocity_fn: VelocityFn, x: jax.Array, num_steps: int, *args,
               start_step: int | None = None, strength: float | None = None) -> jax.Array:
        """Integrates from x (pure noise, or noised latents at `start_step`) to data, float32.

        x [B, ...]; velocity_fn(x [B, ...], timesteps [B] float32, *args) -> v [B, ...].
        start_step (or strength, as diffusers' video-to-video) skips the first, noisiest steps;
        noise clean latents for it with `add_noise` (same num_steps and start).
        """
        num_steps = check_num_steps(num_steps)
        start = resolve_start(num_steps, start_step, strength)
        x = jnp.asarray(x)
        if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be a floating array [B, ...]; got {x.dtype} {x.shape}")
        try:
            hash(velocity_fn)
        except TypeError as err:
            raise ValueError(f"velocity_fn must be hashable (it keys the compiled loop); got "
                             f"{type(velocity_fn).__name__}: pass arrays through *args") from err
        timesteps, tables = self.tables(num_steps, start)
        return _run(velocity_fn, self.spec.kind, self.spec.solver_order, x.astype(jnp.float32),
                    timesteps, tables, args)


def make_sampler(scheduler_config: dict) -> Sampler | ConsistencySampler:
    """A diffusers scheduler_config dict -> Sampler (Euler or UniPC by `_class_name`), or a
    distilled student's few-step `ConsistencySampler` (vdit/diffusion/samplers_consistency.py)."""
    if isinstance(scheduler_config, dict) and scheduler_config.get("_class_name") == CONSISTENCY:
        return parse_consistency_config(scheduler_config)
    return Sampler(parse_scheduler_config(scheduler_config))


@dataclasses.dataclass(frozen=True)
class CFGVelocity:
    """velocity_fn(x, timesteps, cond, uncond) with classifier-free guidance, one model call.

    model_fn(x [B, ...], timesteps [B], cond) -> v. cond/uncond: pytrees of [B, ...] arrays
    (text embeddings, and anything else the model takes per sample). Conditional and
    unconditional rows go through the model as one batch [2B, ...] (cond first), or in two calls
    where their shapes differ past the batch axis (e.g. a negative prompt of another length, which
    diffusers' pipelines take as two calls too); then v = v_u + guidance (v_c - v_u).
    guidance == 1 calls the model on cond only (uncond may be None). Hashable, so the sampling
    loop stays compiled across calls with the same model_fn.
    """

    model_fn: Callable
    guidance: float

    def __call__(self, x, timesteps, cond, uncond=None):
        if self.guidance == 1.0:
            return self.model_fn(x, timesteps, cond)
        if uncond is None:
            raise ValueError(f"guidance={self.guidance} needs an unconditional input; got None")
        if not _batchable(cond, uncond):
            v_cond = self.model_fn(x, timesteps, cond).astype(jnp.float32)
            v_uncond = self.model_fn(x, timesteps, uncond).astype(jnp.float32)
            return v_uncond + self.guidance * (v_cond - v_uncond)
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
        v = self.model_fn(jnp.concatenate([x, x], axis=0),
                          jnp.concatenate([timesteps, timesteps], axis=0), both)
        v_cond, v_uncond = jnp.split(v.astype(jnp.float32), 2, axis=0)
        return v_uncond + self.guidance * (v_cond - v_uncond)


def _batchable(cond, uncond) -> bool:
    """Whether cond and uncond stack into one batch: the same tree, the same shapes past axis 0."""
    c_leaves, c_tree = jax.tree.flatten(cond)
    u_leaves, u_tree = jax.tree.flatten(uncond)
    return c_tree == u_tree and all(jnp.shape(c)[1:] == jnp.shape(u)[1:]
                                    for c, u in zip(c_leaves, u_leaves))


def cfg_velocity(model_fn: Callable, guidance: float) -> CFGVelocity:
    """Wraps model_fn(x, timesteps, cond) into a guided velocity_fn(x, timesteps, cond, uncond).

    Note diffusers' Wan pipelines skip guidance for any guidance <= 1; here only exactly 1.0
    skips the unconditional branch (other values apply the formula as written).
    """
    if isinstance(guidance, bool) or not isinstance(guidance, Real) or not np.isfinite(guidance):
        raise ValueError(f"guidance={guidance!r}; expected a finite Python number (static)")
    return CFGVelocity(model_fn, float(guidance))
