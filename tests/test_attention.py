"""The attention entry point: xla vs a direct reference, splash (interpreted) vs xla, and the
clear errors when a GPU/TPU backend is asked for on the wrong platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.models import attention as attn


def _inputs(b=2, s=12, l_len=9, h=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, n, h, d)).astype(np.float32) for n in (s, l_len, l_len))
    q_seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])[:b, :s].astype(np.int32)
    kv_seg = np.array([[1] * 3 + [2] * 4 + [0] * 2, [1] * 9])[:b, :l_len].astype(np.int32)
    return q, k, v, q_seg, kv_seg


def _reference(q, k, v, q_seg, kv_seg):
    """Loops over rows and queries: softmax over the keys of the same segment only."""
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            keys = kv_seg[b] == q_seg[b, i]
            logits = np.einsum("hd,lhd->hl", q[b, i], k[b, keys]) / np.sqrt(q.shape[-1])
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, i] = np.einsum("hl,lhd->hd", p, v[b, keys])
    return out


def test_xla_matches_reference():
    q, k, v, q_seg, kv_seg = _inputs()
    out = attn.attention(q, k, v, q_seg, kv_seg, backend="xla")
    np.testing.assert_allclose(out, _reference(q, k, v, q_seg, kv_seg), rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_stay_finite_in_xla():
    q, k, v, q_seg, kv_seg = _inputs()
    q_seg = np.full_like(q_seg, 7)  # no key carries id 7
    out = attn.attention(q, k, v, q_seg, kv_seg, backend="xla")
    assert np.isfinite(np.asarray(out)).all()


def test_auto_is_xla_on_cpu():
    assert attn.resolve_backend("auto", "cpu") == "xla"


def test_auto_on_a_gpu_runs_xla_for_what_cudnn_refuses():
    """float32 queries, or heads of a width that is not a multiple of 8: xla, not a cuDNN error
    (a float32 Wan folder sampled on a GPU, the notebooks' random models)."""
    q = lambda dtype, width: jax.ShapeDtypeStruct((1, 4, 2, width), dtype)
    assert attn.resolve_backend("auto", "gpu", q(jnp.bfloat16, 64)) == "cudnn"
    assert attn.resolve_backend("auto", "gpu", q(jnp.float32, 64)) == "xla"
    assert attn.resolve_backend("auto", "gpu", q(jnp.bfloat16, 12)) == "xla"
    assert attn.resolve_backend("auto", "tpu", q(jnp.float32, 12)) == "splash"
    assert attn.resolve_backend("cudnn", "gpu", q(jnp.float32, 64)) == "cudnn"  # asked: its error


@pytest.mark.parametrize("backend,need", [("cudnn", "GPU"), ("splash", "TPU")])
def test_accelerator_backends_fail_clearly_on_cpu(backend, need):
    q, k, v, q_seg, kv_seg = _inputs()
    msg = f"attention backend '{backend}' \\(config.model.attention\\) needs a {need}, but JAX " \
          "is running on 'cpu'"
    with pytest.raises(RuntimeError, match=msg):
        attn.attention(q, k, v, q_seg, kv_seg, backend=backend)


def test_unknown_backend_and_bad_shapes():
    q, k, v, q_seg, kv_seg = _inputs()
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attn.attention(q, k, v, q_seg, kv_seg, backend="flash")
    with pytest.raises(ValueError, match="segment ids"):
        attn.attention(q, k, v, q_seg[:, :4], kv_seg)
    with pytest.raises(ValueError, match="disagree on batch, heads or head width"):
        attn.attention(q[..., :4], k, v, q_seg, kv_seg)
    with pytest.raises(ValueError, match="needs bfloat16 or float16 inputs"):
        attn.cudnn_attention(q, k, v, q_seg, kv_seg)


def test_splash_kernel_matches_xla_in_interpret_mode():
    """The TPU kernel itself, run by the Pallas interpreter: values and gradients."""
    q, k, v, q_seg, kv_seg = _inputs(s=130, l_len=70, d=16)  # not multiples of the block
    q_seg = np.where(np.arange(130) < 60, 1, 2)[None].repeat(2, 0).astype(np.int32)
    kv_seg = np.where(np.arange(70) < 30, 1, 2)[None].repeat(2, 0).astype(np.int32)
    q_seg[0, -5:] = 0  # padding queries (see the key with id 0 below)
    kv_seg[0, -1] = 0

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, q_seg, kv_seg)))

    splash = lambda *a: attn.splash_attention(*a, interpret=True, block=128)
    out_s = splash(q, k, v, q_seg, kv_seg)
    out_x = attn.xla_attention(q, k, v, q_seg, kv_seg)
    np.testing.assert_allclose(out_s, out_x, rtol=1e-4, atol=1e-5)
    g_s = jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2))(q, k, v)
    g_x = jax.grad(lambda *a: loss(attn.xla_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_s, g_x, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_splash_under_a_mesh_runs_per_device():
    """Batch over data and heads over tensor via shard_map (interpreted kernel)."""
    import flax.linen as nn

    from vdit.parallel.mesh import logical_rules, make_mesh

    q, k, v, _, _ = _inputs(s=40, l_len=24, d=16)
    q_seg = np.where(np.arange(40) < 25, 1, 2)[None].repeat(2, 0).astype(np.int32)
    kv_seg = np.where(np.arange(24) < 10, 1, 2)[None].repeat(2, 0).astype(np.int32)
    mesh = make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules("dit")):
        fn = jax.jit(lambda *a: attn.splash_attention(*a, interpret=True, block=128))
        assert "manual_computation" in fn.lower(q, k, v, q_seg, kv_seg).as_text()
        out = fn(q, k, v, q_seg, kv_seg)
    np.testing.assert_allclose(out, attn.xla_attention(q, k, v, q_seg, kv_seg), rtol=1e-4,
                               atol=1e-5)
