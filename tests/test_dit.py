"""WanDiT: packed rows equal per-video runs, padding is harmless, remat saves memory, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dit_testing import pack_row, tiny_model_config

from vdit.models import patches
from vdit.models.dit import build_dit

PATCH = (1, 2, 2)


@pytest.fixture(scope="module")
def model_and_params():
    model = build_dit(tiny_model_config())
    x = jnp.zeros((1, 1, 2, 2, 4))
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros(1), jnp.zeros((1, 3, 16)))
    return model, params["params"]


@pytest.fixture(scope="module")
def packed_fn(model_and_params):
    """One jitted packed call shared by the tests (one compile per input shape)."""
    model, params = model_and_params
    return jax.jit(lambda *b: model.apply({"params": params}, *b, method="packed"))


def _videos(rng):
    shapes = [(3, 4, 4), (2, 6, 4), (5, 2, 2), (1, 4, 6)]  # the last one is an image (T'=1)
    videos = [rng.normal(size=s + (4,)).astype(np.float32) for s in shapes]
    texts = [rng.normal(size=(n, 16)).astype(np.float32) for n in (3, 5, 2, 4)]
    return videos, texts, np.array([10.0, 250.5, 999.0, 600.0], np.float32)


def _stack(rows):
    return [np.stack(parts) for parts in zip(*(r[:6] for r in rows), strict=True)]


def _packed_batch(rng):
    """Row 0: four segments + padding; row 1: two segments (K padded to 4) + padding."""
    videos, texts, ts = _videos(rng)
    row0 = pack_row(videos, texts, ts, PATCH, seq_len=40, text_len=16)
    row1 = pack_row(videos[2:], texts[2:], np.r_[ts[2:], 0, 0], PATCH, seq_len=40, text_len=16)
    return _stack([row0, row1]), (row0[6], row1[6]), videos, texts, ts


def test_packed_row_equals_each_video_alone(model_and_params, packed_fn):
    model, params = model_and_params
    batch, (slices0, slices1), videos, texts, ts = _packed_batch(np.random.default_rng(0))
    out = np.asarray(packed_fn(*batch))
    assert np.isfinite(out).all()  # padding included
    alone = []
    for pair in ((0, 1), (2, 3)):  # each video alone in its row (same shapes: no recompile)
        rows = [pack_row([videos[i]], [texts[i]], np.r_[ts[i], 0, 0, 0], PATCH, 40, 16)
                for i in pair]
        res = np.asarray(packed_fn(*_stack(rows)))
        alone += [res[j, rows[j][6][0]] for j in range(2)]
    for i in range(4):
        np.testing.assert_allclose(out[0, slices0[i]], alone[i], atol=1e-5, rtol=1e-5)
        if i >= 2:  # row 1 holds videos 2 and 3 as its segments 1 and 2
            np.testing.assert_allclose(out[1, slices1[i - 2]], alone[i], atol=1e-5, rtol=1e-5)
    # The dense call is the packed call with one unpadded segment per row.
    dense = model.apply({"params": params}, videos[0][None], ts[:1], texts[0][None])
    assert dense.shape == (1,) + videos[0].shape
    np.testing.assert_allclose(patches.patchify(np.asarray(dense[0]), PATCH)[0], alone[0],
                               atol=1e-5, rtol=1e-5)


def test_padding_gradients_are_finite(model_and_params):
    _, params = model_and_params
    model = build_dit(tiny_model_config(remat="save_dots"))  # also runs the save_dots policy
    batch, *_ = _packed_batch(np.random.default_rng(1))
    batch[5] = np.where(batch[5] == 0, 1, batch[5])  # no text padding: padding tokens see text 1

    def loss(p):
        out = model.apply({"params": p}, *batch, method="packed")
        return jnp.mean(jnp.square(out) * (batch[2][..., None] > 0))

    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


def _train_step(remat: str, params, x, t, c):
    """Compiles a train-like step (loss gradient + SGD update); returns (temp bytes, new params)."""
    model = build_dit(tiny_model_config(remat=remat))

    def step(p, x, t, c):
        grads = jax.grad(lambda q: jnp.mean(model.apply({"params": q}, x, t, c) ** 2))(p)
        return jax.tree_util.tree_map(lambda a, g: a - 1e-2 * g, p, grads)

    compiled = jax.jit(step).lower(params, x, t, c).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled(params, x, t, c)


def test_remat_policies_agree_and_lower_temp_memory(model_and_params):
    _, params = model_and_params
    x = jax.random.normal(jax.random.key(1), (2, 2, 16, 16, 4))
    t, c = jnp.array([10.0, 700.0]), jax.random.normal(jax.random.key(2), (2, 8, 16))
    temp, new = {}, {}
    for remat in ("none", "full", "save_attn"):  # save_dots: see the padding test
        temp[remat], new[remat] = _train_step(remat, params, x, t, c)
    print("temp bytes per remat policy:", temp)
    assert temp["full"] < 0.7 * temp["none"], temp
    assert temp["save_attn"] < temp["none"], temp
    for remat in ("full", "save_attn"):
        for a, b in zip(jax.tree_util.tree_leaves(new["none"]),
                        jax.tree_util.tree_leaves(new[remat]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_input_errors(model_and_params):
    model, params = model_and_params
    batch, *_ = _packed_batch(np.random.default_rng(2))
    apply = lambda *b: model.apply({"params": params}, *b, method="packed")

    bad = list(batch)
    bad[1] = batch[1].copy()
    bad[1][0, 0, 1] = 64  # rope_max_seq_len is 64
    with pytest.raises(ValueError, match=r"outside the RoPE range \[0, rope_max_seq_len=64\)"):
        apply(*bad)
    bad = list(batch)
    bad[4] = np.zeros(batch[4].shape[:2] + (12,), np.float32)
    with pytest.raises(ValueError, match=r"context has shape \(2, 16, 12\), expected \(2, 16, 16\)"):
        apply(*bad)
    bad = list(batch)
    bad[5] = np.where(batch[5] == 3, 0, batch[5])
    with pytest.raises(ValueError, match=r"row 0: segments \[3\] have tokens but no text tokens"):
        apply(*bad)
    bad = list(batch)
    bad[3] = batch[3][:, :2]
    with pytest.raises(ValueError, match="timesteps has K=2 columns"):
        apply(*bad)
    bad = list(batch)
    bad[0] = batch[0][..., :8]
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 40, 8\), expected \(2, 40, 16\)"):
        apply(*bad)
    with pytest.raises(ValueError, match=r"latents must be \[B, T', H', W', C=4\]"):
        model.apply({"params": params}, jnp.zeros((1, 1, 2, 2, 3)), jnp.zeros(1),
                    jnp.zeros((1, 3, 16)))
    with pytest.raises(ValueError, match=r"context has shape \(3, 16\), expected \(1, 'L', 16\)"):
        model.apply({"params": params}, jnp.zeros((1, 1, 2, 2, 4)), jnp.zeros(1),
                    jnp.zeros((3, 16)))
    with pytest.raises(ValueError, match="W'=3 is not a positive multiple of the patch size 2"):
        model.apply({"params": params}, jnp.zeros((1, 1, 2, 3, 4)), jnp.zeros(1),
                    jnp.zeros((1, 3, 16)))


def test_out_of_range_positions_under_jit_give_nan(packed_fn):
    batch, *_ = _packed_batch(np.random.default_rng(3))
    batch[1] = batch[1].copy()
    batch[1][0, 0, 0] = 100
    batch[1][1, 0, 2] = -1
    out = np.asarray(packed_fn(*batch))
    assert np.isnan(out[0, 0]).all() and np.isnan(out[1, 0]).all()


def test_config_errors():
    with pytest.raises(ValueError, match=r"config.model has unknown keys \['heads'\]"):
        build_dit(tiny_model_config(heads=3))
    with pytest.raises(ValueError, match="config.model.remat='some'"):
        build_dit(tiny_model_config(remat="some")).init(
            jax.random.key(0), jnp.zeros((1, 1, 2, 2, 4)), jnp.zeros(1), jnp.zeros((1, 1, 16)))
