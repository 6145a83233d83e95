"""Small shared pieces of the transformers: dense layers with logical axes, norms, 3D RoPE,
sinusoidal timestep features, adaLN modulation and the GELU(tanh) MLP.

Numerics follow diffusers' Wan modules: LayerNorm/RMSNorm in float32, RoPE tables computed in
float64 then stored as float32, timestep features `[cos, sin]` with exponent `-ln(P) * i / half`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.models.mixed_dot import mixed_dot

Dtype = Any
AxisNames = tuple[str | None, ...]


def concrete_value(x) -> np.ndarray | None:
    """x as a numpy array, or None under tracing (value checks run only on concrete inputs)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def xavier_uniform(n_in: int):
    """Glorot-uniform over a kernel whose first `n_in` axes are inputs and the rest outputs."""

    def init(key, shape, dtype=jnp.float32):
        in_axes = tuple(range(n_in))
        out_axes = tuple(range(n_in, len(shape)))
        return jax.nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=in_axes, out_axis=out_axes)(key, shape, dtype)

    return init


class Dense(nn.Module):
    """Contracts the last `in_dims` axes of x with a kernel `[*in, *features]` (+ bias).

    `kernel_axes` / `bias_axes` are the logical names of the kernel and bias axes. `matmul_dtype`
    (None: the compute `dtype`) rounds both operands to it and accumulates in float32
    (vdit/models/mixed_dot.py).
    """

    features: tuple[int, ...]
    kernel_axes: AxisNames
    bias_axes: AxisNames
    in_dims: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.in_dims:]
        kshape = tuple(in_shape) + tuple(self.features)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            xavier_uniform(self.in_dims), self.kernel_axes), kshape, self.param_dtype)
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        if self.matmul_dtype is None:
            y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                    (contract, ((), ())))
        else:
            y = mixed_dot(x, kernel, self.in_dims, self.matmul_dtype).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), self.bias_axes), tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def layer_norm(x, eps: float, scale=None, bias=None):
    """LayerNorm over the last axis in float32 (two-pass variance, as torch computes it)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


class LayerNorm(nn.Module):
    """Affine float32 LayerNorm over the last axis, params named like torch (scale, bias)."""

    eps: float

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("norm",)), (d,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("norm",)), (d,), jnp.float32)
        return layer_norm(x, self.eps, scale, bias)


class RMSNorm(nn.Module):
    """RMSNorm over the trailing `len(axes)` axes (e.g. all heads at once), in float32."""

    eps: float
    axes: AxisNames = ("norm",)

    @nn.compact
    def __call__(self, x):
        n = len(self.axes)
        shape = x.shape[x.ndim - n:]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 self.axes), shape, jnp.float32)
        xf = x.astype(jnp.float32)
        red = tuple(range(x.ndim - n, x.ndim))
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(red, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


def modulate(x_normed, shift, scale):
    """adaLN: norm(x) * (1 + scale) + shift (float32)."""
    return x_normed * (1.0 + scale) + shift


def timestep_features(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal features `[..., dim]` = [cos(t w_i), sin(t w_i)], w_i = P^(-i/half); float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How Wan splits a head's channels over (t, h, w): h = w = 2 * (head_dim // 6), t the rest."""
    hw = 2 * (head_dim // 6)
    t = head_dim - 2 * hw
    if head_dim % 2 or t <= 0 or t % 2:
        raise ValueError(f"attention_head_dim={head_dim} cannot be split into even (t, h, w) "
                         "RoPE parts; use an even head dim >= 6")
    return t, hw, hw


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> list[np.ndarray]:
    """Per axis (t, h, w): angle table `[max_len, dim_axis / 2]`, float64 (as diffusers)."""
    tables = []
    for dim in rope_axis_dims(head_dim):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        tables.append(np.outer(np.arange(max_len, dtype=np.float64), freqs))
    return tables


def rope_cos_sin(positions, head_dim: int, max_len: int, theta: float = 10000.0):
    """Integer positions `[..., 3]` -> (cos, sin) `[..., head_dim / 2]` float32.

    Positions outside [0, max_len) give NaN under jit (checked eagerly by callers that can).
    """
    cos_parts, sin_parts = [], []
    for axis, table in enumerate(rope_tables(head_dim, max_len, theta)):
        idx = positions[..., axis]
        idx = jnp.where(idx < 0, max_len, idx)  # negative ids would wrap around; make them NaN
        cos_parts.append(jnp.take(jnp.asarray(np.cos(table), jnp.float32), idx, axis=0,
                                  mode="fill", fill_value=jnp.nan))
        sin_parts.append(jnp.take(jnp.asarray(np.sin(table), jnp.float32), idx, axis=0,
                                  mode="fill", fill_value=jnp.nan))
    return jnp.concatenate(cos_parts, -1), jnp.concatenate(sin_parts, -1)


def apply_rope(x, cos, sin):
    """Rotates channel pairs (2i, 2i+1) of x `[B, S, H, Dh]` by angles with cos/sin `[B, S, Dh/2]`."""
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class MLP(nn.Module):
    """Linear -> activation -> Linear; the hidden axis is logical `hidden_axis`."""

    hidden: int
    out: int
    in_axis: str
    hidden_axis: str
    out_axis: str
    activation: str = "gelu_tanh"
    dtype: Dtype = jnp.float32
    act_constraint: Sequence[str | None] | None = None
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x):
        h = Dense((self.hidden,), (self.in_axis, self.hidden_axis), (self.hidden_axis,),
                  dtype=self.dtype, matmul_dtype=self.matmul_dtype, name="linear_1")(x)
        if self.act_constraint is not None:
            h = nn.with_logical_constraint(h, tuple(self.act_constraint))
        h = activation(self.activation, h)
        h = jax.ad_checkpoint.checkpoint_name(h, "mlp_hidden")
        return Dense((self.out,), (self.hidden_axis, self.out_axis), (self.out_axis,),
                     dtype=self.dtype, matmul_dtype=self.matmul_dtype, name="linear_2")(h)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


# transformers' `hidden_act` / `feed_forward_proj` names (its ACT2FN) for the encoders it defines:
# every one without learned parameters (prelu and xielu have them).
HF_ACTIVATIONS = {
    "gelu": _gelu, "gelu_python": _gelu, "gelu_10": lambda x: jnp.clip(_gelu(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh, "gelu_python_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu, "relu6": jax.nn.relu6, "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01), "hardswish": jax.nn.hard_swish,
    "silu": jax.nn.silu, "swish": jax.nn.silu, "linear": lambda x: x,
    "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "sqrtsoftplus": lambda x: jnp.sqrt(jax.nn.softplus(x)),
    "laplace": lambda x: 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * 2 ** 0.5))),
}


def activation(name: str, x):
    acts = {"gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True),
            "gelu": lambda v: jax.nn.gelu(v, approximate=False), "silu": jax.nn.silu}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(acts)}")
    return acts[name](x)
