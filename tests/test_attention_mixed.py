"""vdit/models/attention_mixed.py: the hand-written backward is exact (float32 operands against the
xla backend's autodiff), and bfloat16 operands stay within bfloat16's rounding of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.models import attention as attn
from vdit.models.attention_mixed import mixed_attention


def _packed(b=2, s=40, l_len=40, h=3, d=16, seed=0):
    """Rows of several segments (one of them a single token, as an image's patch would be), a
    padded tail (id 0) and, in row 1, queries whose segment no key carries (id 9)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, s, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, l_len, h, d)).astype(np.float32) for _ in range(2))
    q_seg = np.zeros((b, s), np.int32)
    q_seg[0, :17], q_seg[0, 17:18], q_seg[0, 18:35] = 1, 2, 3
    q_seg[1, :30], q_seg[1, 30:] = 5, 9
    kv_seg = np.zeros((b, l_len), np.int32)
    kv_seg[0, :11], kv_seg[0, 11:12], kv_seg[0, 12:36] = 1, 2, 3
    kv_seg[1, :25] = 5
    return tuple(map(jnp.asarray, (q, k, v, q_seg, kv_seg)))


def _value_and_grads(fn, q, k, v, q_seg, kv_seg, g):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, q_seg, kv_seg) * g)
    return fn(q, k, v, q_seg, kv_seg), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("s,l_len", [(40, 40), (40, 12)])  # self-attention; short packed text
def test_float32_operands_equal_the_xla_backend(s, l_len):
    q, k, v, q_seg, kv_seg = _packed(s=s, l_len=l_len)
    g = jax.random.normal(jax.random.key(1), q.shape)
    out, grads = _value_and_grads(lambda *a: mixed_attention(*a, jnp.float32),
                                  q, k, v, q_seg, kv_seg, g)
    ref_out, ref_grads = _value_and_grads(attn.xla_attention, q, k, v, q_seg, kv_seg, g)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_operands_stay_within_rounding_and_keep_input_dtypes():
    q, k, v, q_seg, kv_seg = _packed(seed=3)
    g = jax.random.normal(jax.random.key(2), q.shape)
    out, grads = jax.jit(lambda *a: _value_and_grads(
        lambda *b: attn.attention(*b, backend="xla", matmul_dtype=jnp.bfloat16), *a))(
        q, k, v, q_seg, kv_seg, g)
    ref_out, ref_grads = _value_and_grads(attn.xla_attention, q, k, v, q_seg, kv_seg, g)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert out.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in grads)
    # bfloat16 keeps 8 bits: relative errors of a few 1e-3; zero would mean no rounding happened
    assert 1e-4 < rel(out, ref_out) < 1e-2
    for a, b in zip(grads, ref_grads):
        assert 1e-4 < rel(a, b) < 2e-2
    assert np.isfinite(np.asarray(out)).all()  # row 1's queries that see no key


def test_other_backends_ignore_the_matmul_dtype():
    q, k, v, q_seg, kv_seg = _packed()
    out = attn.local_attention(q, k, v, q_seg, kv_seg, "memory_proxy", matmul_dtype=jnp.bfloat16)
    ref = attn.local_attention(q, k, v, q_seg, kv_seg, "memory_proxy")
    np.testing.assert_array_equal(out, ref)
