"""Micro-conditioning (Stable Video Diffusion style): per-video scalars such as the frame rate and
the amount of motion, embedded and added to the DiT's timestep embedding.

`config.model.micro_conditioning` lists the names (a subset of MICRO_NAMES, default empty). Each
named scalar goes through the same sinusoidal features as the timestep (`freq_dim` wide) and its
own two-layer SiLU MLP into the model width; the MLP's last layer starts at zero, so a model that
gains micro-conditioning (e.g. on top of loaded Wan2.1 weights) computes exactly what it did
before until training moves that layer. The sum joins the timestep embedding before the adaLN
projections (every block's modulation and the output norm see it).

Values (per segment `[B, K]` in the packed call, `[B]` in the dense one):
  fps     frames per second of the clip, as rendered / decoded.
  motion  how fast the content moves, in frame short sides per second (the unit of
          `vdit/curate/motion.py`; the synthetic world's ground-truth main-object speed).
MICRO_SCALES maps each value onto the sinusoid's range before the features (the timestep enters as
1000 t for the same reason): motion ~0..1 becomes 0..100, so 0.01 short sides/s is one unit.
These scales are part of a trained model's definition; changing them invalidates its weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.models.layers import Dense, timestep_features

MICRO_NAMES = ("fps", "motion")
MICRO_SCALES = {"fps": 1.0, "motion": 100.0}


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    """`config.model.micro_conditioning` -> a tuple of known, distinct names (else an error)."""
    if isinstance(names, str):
        raise ValueError(f"config.model.micro_conditioning must be a list of names from "
                         f"{list(MICRO_NAMES)}, got the string {names!r}")
    names = tuple(names)
    bad = [n for n in names if n not in MICRO_NAMES]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"config.model.micro_conditioning = {list(names)}: names must be "
                         f"distinct and from {list(MICRO_NAMES)}" + (f" (unknown: {bad})" if bad else ""))
    return names


def check_values(names: Sequence[str], micro: Mapping | None, shape: tuple[int, ...]) -> None:
    """The model's `micro` argument: exactly the model's names, each of `shape` ([B, K])."""
    given = sorted(micro or {})
    if not names:
        if given:
            raise ValueError(f"micro-conditioning values {given} were given but this model has "
                             "none (config.model.micro_conditioning is empty)")
        return
    if given != sorted(names):
        raise ValueError(f"this model is micro-conditioned on {list(names)} "
                         f"(config.model.micro_conditioning); got values for {given}")
    for name in names:
        if tuple(jnp.shape(micro[name])) != tuple(shape):
            raise ValueError(f"micro-conditioning value {name!r} has shape "
                             f"{tuple(jnp.shape(micro[name]))}, expected {tuple(shape)} (like "
                             "the timesteps: one per segment)")


class ZeroOutMLP(nn.Module):
    """features [..., F] -> Linear(F, D), SiLU, Linear(D, D) with the last layer zero-initialised."""

    dim: int

    @nn.compact
    def __call__(self, x):
        h = Dense((self.dim,), ("time_embed", "mlp"), ("mlp",), name="linear_1")(x)
        h = jax.nn.silu(h)
        kernel = self.param("kernel_2", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("mlp", "embed")), (self.dim, self.dim), jnp.float32)
        bias = self.param("bias_2", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("embed",)), (self.dim,), jnp.float32)
        return h @ kernel + bias


class MicroEmbedder(nn.Module):
    """{name: values [B, K]} -> the summed embeddings [B, K, dim] (float32)."""

    names: tuple[str, ...]
    dim: int
    freq_dim: int

    @nn.compact
    def __call__(self, micro: Mapping) -> jax.Array:
        total = 0.0
        for name in self.names:
            values = jnp.asarray(micro[name], jnp.float32) * MICRO_SCALES[name]
            total = total + ZeroOutMLP(self.dim, name=name)(timestep_features(values,
                                                                              self.freq_dim))
        return total



def check_given(names: Sequence[str], given: Mapping) -> dict:
    """Sampling-time values {name: float} (None entries dropped); a value for a name the model is
    not conditioned on is an error naming the flag."""
    given = {k: float(v) for k, v in given.items() if v is not None}
    extra = sorted(set(given) - set(names))
    if extra:
        raise ValueError(f"{', '.join(f'{k}={given[k]}' for k in extra)} given (vdit sample "
                         f"{' '.join('--' + k for k in extra)}) but this model is not "
                         f"micro-conditioned on {extra} (config.model.micro_conditioning = "
                         f"{list(names)})")
    return given


def sampling_values(names: Sequence[str], given: Mapping, defaults: Mapping) -> dict:
    """{name: float} for every name of the model: `given` over `defaults`; a missing one is an
    error naming the flag."""
    given = check_given(names, given)
    out = {}
    for name in names:
        value = given.get(name, defaults.get(name))
        if value is None:
            raise ValueError(f"this model is micro-conditioned on {name!r}: give a value "
                             f"({name}=..., vdit sample --{name})")
        out[name] = float(value)
    return out
