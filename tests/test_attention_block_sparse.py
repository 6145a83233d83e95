"""The block_sparse backend: block maps, and both kernels (TPU Mosaic, GPU Triton) run by the Pallas
interpreter against the xla backend, forward and gradients, on packed rows (many short segments =
images, one long segment, padding) and on cross-attention to packed text. Small blocks keep the
interpreter affordable."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.models import attention as attn
from vdit.models import attention_blocks as blocks
from vdit.models import attention_pallas_tpu as pallas_tpu

TOL = 1e-5  # relative (norm) error in float32, the bar


def _rows(lengths_per_row, total):
    """Packed segment ids `[B, total]`: segments 1..n of the given lengths, then padding (0)."""
    out = np.zeros((len(lengths_per_row), total), np.int32)
    for row, lengths in enumerate(lengths_per_row):
        out[row, :sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    return out


# Row 0: eight 1-frame "images" of 5 tokens and 6 padding tokens; row 1: one long segment.
SELF_IDS = _rows([[5] * 8, [46]], 46)
# Cross-attention: queries of row 0 above to its packed captions (3 tokens each, then padding);
# row 1's one clip to its caption of 9 tokens, then padding (padding queries see padding text).
SELF_IDS_X = _rows([[5] * 8, [40]], 46)
TEXT_IDS = _rows([[3] * 8, [9]], 28)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _qkv(s, l_len, h=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=(2, n, h, d)).astype(np.float32) for n in (s, l_len, l_len))


def compare(platform, q_ids, kv_ids, block=8):
    """Max relative errors (forward, and each of dq, dk, dv) of the interpreted kernel vs xla."""
    q, k, v = _qkv(q_ids.shape[1], kv_ids.shape[1])
    kernel = lambda q, k, v: attn.block_sparse_attention(  # noqa: E731
        q, k, v, q_ids, kv_ids, platform=platform, interpret=True, blocks=(block, block))
    ref = lambda q, k, v: attn.xla_attention(q, k, v, q_ids, kv_ids)  # noqa: E731

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a)) * q[..., :1, :]), argnums=(0, 1, 2))(
            q, k, v)

    fwd = _rel(kernel(q, k, v), ref(q, k, v))
    return fwd, max(_rel(a, b) for a, b in zip(grads(kernel), grads(ref), strict=True))


@pytest.mark.parametrize("platform,block", [("tpu", 8), ("gpu", 16)])
def test_self_attention_on_packed_rows_matches_xla(platform, block):
    fwd, grad = compare(platform, SELF_IDS, SELF_IDS, block)
    assert fwd < TOL and grad < TOL, (fwd, grad)


@pytest.mark.parametrize("platform,block", [("tpu", 8), ("gpu", 16)])
def test_cross_attention_to_packed_text_matches_xla(platform, block):
    fwd, grad = compare(platform, SELF_IDS_X, TEXT_IDS, block)
    assert fwd < TOL and grad < TOL, (fwd, grad)


def test_block_map_is_tight_on_packed_rows_and_never_drops_a_pair():
    rng = np.random.default_rng(1)
    for _ in range(20):
        lengths = [list(rng.integers(1, 40, size=rng.integers(1, 12))) for _ in range(3)]
        ids = _rows(lengths, 512)
        text = _rows([[int(x) for x in rng.integers(1, 9, size=len(r))] for r in lengths], 128)
        for kv, bk in ((ids, 32), (text, 16)):
            pairs = np.asarray(blocks.block_pairs(jnp.asarray(ids), jnp.asarray(kv), 32, bk))
            needed = blocks.needed_pairs(ids, kv, 32, bk)
            assert (pairs >= needed).all()  # never skips a pair that holds work
            np.testing.assert_array_equal(pairs, needed)  # and, for packed rows, exact
            computed = blocks.computed_pairs(jnp.asarray(ids), jnp.asarray(kv), 32, bk)
            np.testing.assert_array_equal(computed, needed.sum(axis=(1, 2)))  # runs = the map


def test_block_runs_span_first_to_last_meeting_block():
    pairs = jnp.asarray([[[False, True, False, True], [False] * 4, [True] * 4,
                          [False, False, True, False]]])
    start, cnt = blocks.block_runs(pairs)
    np.testing.assert_array_equal(start, [[1, 0, 0, 2]])
    np.testing.assert_array_equal(cnt, [[3, 0, 4, 1]])  # a gap inside a run is computed, masked


def test_tpu_kernel_computes_only_listed_blocks():
    """With query block 0's run emptied, its rows come out 0: the map, not the mask, drives it."""
    ids = jnp.asarray(_rows([[8, 8]], 16))
    q, k, v = (jnp.asarray(x[:1].swapaxes(1, 2)) for x in _qkv(16, 16))
    (start, cnt), _ = blocks.kernel_maps(ids, ids, 8, 8)
    out = pallas_tpu._forward((8, 8, True), q, k, v, ids, ids, (start, cnt.at[0, 0].set(0)))[0]
    full = pallas_tpu._forward((8, 8, True), q, k, v, ids, ids, (start, cnt))[0]
    assert float(jnp.abs(out[:, :, :8]).max()) == 0.0
    np.testing.assert_array_equal(out[:, :, 8:], full[:, :, 8:])


def test_block_sparse_is_opt_in_and_fails_clearly_on_cpu():
    # `auto` stays on cudnn/splash until block_sparse has compiled and been timed on a device.
    assert attn.resolve_backend("auto", "gpu") == "cudnn"
    assert attn.resolve_backend("auto", "tpu") == "splash"
    assert attn.resolve_backend("block_sparse", "tpu") == "block_sparse"
    q, k, v = _qkv(8, 8)
    with pytest.raises(RuntimeError, match="'block_sparse' .* needs a GPU or TPU"):
        attn.attention(q, k, v, SELF_IDS[:, :8], SELF_IDS[:, :8], backend="block_sparse")


def test_block_sparse_under_a_mesh_runs_per_device():
    """Batch over data and heads over tensor via shard_map; each device builds its own block map."""
    import flax.linen as nn

    from vdit.parallel.mesh import logical_rules, make_mesh

    q, k, v = _qkv(46, 46)
    mesh = make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules("dit")):
        fn = jax.jit(lambda *a: attn.block_sparse_attention(*a, platform="gpu", interpret=True,
                                                            blocks=(16, 16)))
        assert "manual_computation" in fn.lower(q, k, v, SELF_IDS, SELF_IDS).as_text()
        out = fn(q, k, v, SELF_IDS, SELF_IDS)
    assert _rel(out, attn.xla_attention(q, k, v, SELF_IDS, SELF_IDS)) < TOL


def test_unordered_segments_stay_exact():
    """Ids out of order (1, 2, 1, 0): a run spans a block its query block does not meet; the
    in-block mask keeps the result exact."""
    ids = np.repeat(np.array([[1, 2, 1, 0]], np.int32), [16, 16, 16, 8], axis=1).repeat(2, 0)
    fwd, grad = compare("gpu", ids, ids, 16)
    assert fwd < TOL and grad < TOL, (fwd, grad)


def test_tpu_kernel_with_full_lane_blocks():
    """Blocks of 256 (the TPU path that tiles lane-replicated values) on a row of 300 tokens."""
    ids = _rows([[100, 150, 30], [300]], 300)
    fwd, grad = compare("tpu", ids, ids, 256)
    assert fwd < TOL and grad < TOL, (fwd, grad)


# What the device compilers are handed, from this CPU machine: each kernel lowered for its real
# target (jax's lowering_platforms), forward and backward, in bfloat16. Pallas checks the block
# shapes against the hardware here (TPU: (8, 128) tiles; Triton: power-of-two arrays), so a block
# a device would refuse fails in make test, not on the pod.
KERNEL_CALLS = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", "__gpu$xla.gpu.triton")}


def _lowered(fn, platform, s, l_len, heads, dim):
    rng = np.random.default_rng(0)
    q_ids = np.sort(rng.integers(1, 6, (2, s)), axis=1).astype(np.int32)
    kv_ids = np.sort(rng.integers(1, 6, (2, l_len)), axis=1).astype(np.int32)
    q, k, v = (jnp.zeros((2, n, heads, dim), jnp.bfloat16) for n in (s, l_len, l_len))
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, q_ids, kv_ids).astype(jnp.float32))  # noqa: E731
    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v)
    return traced.lower(lowering_platforms=(KERNEL_CALLS[platform][0],)).as_text()


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("s,l_len,heads,dim", [
    (1024, 1024, 12, 128),  # Wan2.1-1.3B's heads on a packed row
    (700, 700, 2, 64),      # a row that is no block multiple
    (700, 96, 2, 128),      # cross-attention to packed text
    (300, 300, 1, 40),      # a head width that is no power of two (Triton pads it)
])
def test_kernels_lower_for_their_device(platform, s, l_len, heads, dim):
    fn = lambda *a: attn.block_sparse_attention(*a, platform=platform, shard=False)  # noqa: E731
    text = _lowered(fn, platform, s, l_len, heads, dim)
    assert set(re.findall(r"stablehlo.custom_call @([\w$.]+)", text)) == {KERNEL_CALLS[platform][1]}
    for kernel in ("fwd", "dq", "dkv"):  # the forward and the two backward kernels, once each
        assert len(re.findall(rf'"vdit_block_sparse_{kernel}"', text)) == 1, kernel


def test_splash_lowers_for_tpu():
    """auto's TPU kernel, on a row that is no block multiple."""
    fn = lambda *a: attn.splash_attention(*a, shard=False)  # noqa: E731
    assert "tpu_custom_call" in _lowered(fn, "tpu", 700, 700, 2, 128)


@pytest.mark.parametrize("platform,blocks,message", [
    ("tpu", (64, 64), "divisible by 8 and 128"), ("gpu", (48, 48), "power of 2")])
def test_blocks_a_device_refuses_fail_at_lowering(platform, blocks, message):
    fn = lambda *a: attn.block_sparse_attention(*a, platform=platform, shard=False,  # noqa: E731
                                                blocks=blocks)
    with pytest.raises(ValueError, match=message):
        _lowered(fn, platform, 256, 256, 2, 64)
