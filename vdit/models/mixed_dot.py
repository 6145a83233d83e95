"""Mixed-precision matmul for dense layers: operands rounded to a low dtype, products summed in float32.

`mixed_dot(x, kernel, in_dims, low)` contracts the last `in_dims` axes of x `[..., *in]` with
kernel `[*in, *out]` and returns float32 `[..., *out]`. Both operands are rounded to `low`
(bfloat16) and the products are accumulated in float32: what a TPU does for a float32 matmul at
default precision. The backward pass does the same for its two matmuls.

It is a CPU lever (`config.model.matmul_dtype`) on CPUs with bfloat16 units: XLA:CPU runs a
bfloat16 x bfloat16 -> float32 matmul on the AMX / AVX512-BF16 units (Intel Xeon 4th gen and
later), several times faster than a float32 one, but only when the operands are row-major and
contracted over lhs's last axis (otherwise it upcasts them to float32 and runs the float32 kernel;
an AVX2-only CPU has no such units and gains nothing: on a 2-core AMD EPYC the demo's train step
took 1.75-1.95 s with it and 1.72-1.97 s without in two runs of bench/train.py). The backward
pass is therefore written by hand:
- dx = g . kernel^T contracts g's last axis with the kernel's output axis, which runs as is;
- dkernel = x^T . g contracts over the tokens, lhs's first axis, so the narrower of x and g is
  materialised transposed and row-major first (x^T . g, or (g^T . x)^T; `_weight_grad`). A plain
  transpose would only become a layout (XLA assigns transposes the permuted layout), so it goes
  through a reshape behind an optimization barrier, which XLA must copy.
The residuals are kept as integers of their width (`stash`): with remat "none" the layer scan
stacks them, and XLA:CPU updates a bfloat16 stack by converting all of it.
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


def stash(x):
    """A low-precision residual as unsigned ints of its width, for the backward pass.

    Without remat, a scan over layers stacks every residual into a `[layers, ...]` buffer, one
    dynamic-update-slice per layer. XLA:CPU upcasts bfloat16 element-wise ops to float32, so on a
    bfloat16 stack each update converts the whole buffer there and back (layers x the bytes);
    integers are updated in place. `unstash` undoes it (both are bitcasts, free)."""
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def unstash(bits, dtype):
    return jax.lax.bitcast_convert_type(bits, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot2d(x, w, low):
    return _matmul(x.astype(low), w.astype(low))


def _dot2d_fwd(x, w, low):
    xl, wl = x.astype(low), w.astype(low)
    # zero-size stand-ins carry the operands' dtypes to the backward pass
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return _matmul(xl, wl), (stash(xl), stash(wl), dtypes)


def _dot2d_bwd(low, res, g):
    xl, wl, (x_dtype, w_dtype) = res
    xl, wl = unstash(xl, low), unstash(wl, low)
    gl = g.astype(low)
    dx = jax.lax.dot_general(gl, wl, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw = _weight_grad(xl, gl)
    return dx.astype(x_dtype.dtype), dw.astype(w_dtype.dtype)


def _weight_grad(xl, gl):
    """x^T g for x `[M, K]`, g `[M, N]`, contracted over the M tokens: one operand is transposed
    row-major first (module docstring), the narrower one. Transposing the wide one reads it
    column-wise; XLA fuses that transpose with x's producers (e.g. the GELU before the FFN's
    second matmul) into a loop striding a page per element, about 40x a plain transpose at
    1280 x 1536. When g is the narrower, (g^T x)^T is the same product."""
    if xl.shape[1] <= gl.shape[1]:
        return _matmul(_row_major_transpose(xl), gl)
    return row_major(_matmul(_row_major_transpose(gl), xl)).T  # row-major: the AMX kernel's output


_dot2d.defvjp(_dot2d_fwd, _dot2d_bwd)
