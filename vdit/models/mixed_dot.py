"""Mixed-precision matmul for dense layers: operands rounded to a low dtype, products summed in float32.

`mixed_dot(x, kernel, in_dims, low)` contracts the last `in_dims` axes of x `[..., *in]` with
kernel `[*in, *out]` and returns float32 `[..., *out]`. Both operands are rounded to `low`
(bfloat16) and the products are accumulated in float32: what a TPU does for a float32 matmul at
default precision. The backward pass does the same for its two matmuls.

It is a CPU lever (`config.model.matmul_dtype`): XLA:CPU runs a bfloat16 x bfloat16 -> float32
matmul on the AMX / AVX512-BF16 units, several times faster than a float32 one, but only when the
operands are row-major and contracted over lhs's last axis (otherwise it upcasts them to float32
and runs the float32 kernel). The backward pass is therefore written by hand:
- dx = g . kernel^T contracts g's last axis with the kernel's output axis, which runs as is;
- dkernel = x^T . g contracts over the tokens, lhs's first axis, so x^T is materialised row-major
  first. A plain transpose would only become a layout (XLA assigns transposes the permuted
  layout), so it goes through a reshape behind an optimization barrier, which XLA must copy.
Being a custom_vjp, it has no forward-mode rule: `jax.jvp` through a model that uses it fails, so
jvp paths run the model with `matmul_dtype` None (vdit/distill/objective.py forward_mode_model).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def mixed_dot(x, kernel, in_dims: int, low) -> jax.Array:
    """x `[..., *in]` . kernel `[*in, *out]` -> float32 `[..., *out]`, operands rounded to `low`."""
    lead, ins = x.shape[:x.ndim - in_dims], x.shape[x.ndim - in_dims:]
    if tuple(kernel.shape[:in_dims]) != tuple(ins):
        raise ValueError(f"mixed_dot: x's last {in_dims} axes {tuple(ins)} do not match the "
                         f"kernel's input axes {tuple(kernel.shape[:in_dims])}")
    outs = kernel.shape[in_dims:]
    k, m = int(np.prod(ins)), int(np.prod(lead))
    y = _dot2d(x.reshape(m, k), kernel.reshape(k, -1), jnp.dtype(low))
    return y.reshape(*lead, *outs)


def _matmul(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def row_major(x):
    """x stored row-major: a transpose alone only becomes a layout (XLA gives it the permuted
    one); a reshape behind an optimization barrier forces the copy."""
    return jax.lax.optimization_barrier(x.reshape(*x.shape, 1)).reshape(x.shape)


def _row_major_transpose(a):
    """a `[M, K]` -> a^T `[K, M]` stored row-major (see the module docstring)."""
    return row_major(a.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot2d(x, w, low):
    return _matmul(x.astype(low), w.astype(low))


def _dot2d_fwd(x, w, low):
    xl, wl = x.astype(low), w.astype(low)
    # zero-size stand-ins carry the operands' dtypes to the backward pass
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return _matmul(xl, wl), (xl, wl, dtypes)


def _dot2d_bwd(low, res, g):
    xl, wl, (x_dtype, w_dtype) = res
    gl = g.astype(low)
    dx = jax.lax.dot_general(gl, wl, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw = _matmul(_row_major_transpose(xl), gl)
    return dx.astype(x_dtype.dtype), dw.astype(w_dtype.dtype)


_dot2d.defvjp(_dot2d_fwd, _dot2d_bwd)
