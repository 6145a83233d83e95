"""Flow-matching objective: time sampling and shift, per-segment times, packed loss."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdit.diffusion import flow


def _cfg(**kw):
    base = dict(time_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, shift_mode="resolution",
                shift=1.0, base_tokens=64, max_shift=8.0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_time_sampling_ranges_and_errors():
    rng = jax.random.key(0)
    for kind in flow.TIME_SAMPLINGS:
        t = flow.sample_times(rng, (4096,), _cfg(time_sampling=kind))
        assert float(t.min()) > 0 and float(t.max()) < 1
        assert abs(float(t.mean()) - 0.5) < 0.03
    with pytest.raises(ValueError, match="flow.time_sampling"):
        flow.sample_times(rng, (2,), _cfg(time_sampling="beta"))


def test_shift_pushes_towards_noise_and_keeps_ends():
    t = jnp.linspace(0, 1, 11)
    np.testing.assert_allclose(flow.shift_times(t, 1.0), t, atol=1e-7)
    shifted = flow.shift_times(t, 3.0)
    assert float(shifted[0]) == 0 and abs(float(shifted[-1]) - 1) < 1e-6
    assert bool(jnp.all(shifted[1:-1] > t[1:-1]))


def test_resolution_shift_grows_with_tokens():
    s = flow.resolution_shift(jnp.array([16, 64, 256, 10_000]), _cfg())
    np.testing.assert_allclose(s, [1.0, 1.0, 2.0, 8.0], rtol=1e-6)
    fixed = flow.resolution_shift(jnp.array([16, 10_000]), _cfg(shift_mode="fixed", shift=5.0))
    np.testing.assert_allclose(fixed, [5.0, 5.0])


def test_segment_times_follow_segments():
    seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    t = flow.sample_segment_times(jax.random.key(1), seg, 3, _cfg(base_tokens=2))
    assert t.shape == (2, 3)
    per_tok = flow.per_token(t, seg)
    np.testing.assert_allclose(per_tok[0, :2], t[0, 0])
    np.testing.assert_allclose(per_tok[0, 2:5], t[0, 1])
    np.testing.assert_array_equal(flow.segment_token_counts(seg, 3), [[2, 3, 0], [6, 0, 0]])


def test_packed_loss_averages_per_segment_then_over_segments():
    seg = jnp.array([[1, 1, 1, 2, 0, 0]])
    target = jnp.zeros((1, 6, 2))
    # segment 1: squared error 1 on 3 tokens; segment 2: error 4 on 1 token; padding: huge, ignored.
    pred = jnp.array([[[1, 1], [1, 1], [1, 1], [2, 2], [100, 100], [100, 100]]], jnp.float32)
    loss, per_seg = flow.packed_loss(pred, target, seg, 3)
    np.testing.assert_allclose(per_seg, [[1.0, 4.0, 0.0]])
    np.testing.assert_allclose(loss, 2.5)
    mask = jnp.array([[0, 1, 1, 1, 1, 1]])
    loss_masked, _ = flow.packed_loss(pred, target, seg, 3, loss_mask=mask)
    np.testing.assert_allclose(loss_masked, 2.5)


def test_loss_segments_counts_what_packed_loss_averages():
    """Its weight under gradient accumulation: sum(loss * segments) / sum(segments) over two
    halves is the loss of the whole batch (the plain mean of the halves' losses is not)."""
    seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 3, 4]])
    pred = jax.random.normal(jax.random.key(0), (2, 6, 2))
    target = jnp.zeros((2, 6, 2))
    np.testing.assert_array_equal(flow.loss_segments(seg, 4), 5.0)
    # a segment whose every token is masked out takes no part: row 1's segment 4
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(flow.loss_segments(seg, 4, mask), 4.0)
    np.testing.assert_array_equal(flow.loss_segments(jnp.zeros((1, 6), jnp.int32), 4), 0.0)
    for m in (None, mask):
        whole = flow.packed_loss(pred, target, seg, 4, m)[0]
        halves = [(flow.packed_loss(pred[i:i + 1], target[i:i + 1], seg[i:i + 1], 4,
                                    None if m is None else m[i:i + 1])[0],
                   flow.loss_segments(seg[i:i + 1], 4, None if m is None else m[i:i + 1]))
                  for i in (0, 1)]
        weighted = sum(loss * w for loss, w in halves) / sum(w for _, w in halves)
        np.testing.assert_allclose(weighted, whole, rtol=1e-6)
        assert abs(float((halves[0][0] + halves[1][0]) / 2 - whole)) > 1e-2


def test_noisy_tokens_interpolate():
    x0, noise = jnp.ones((1, 2, 3)), -jnp.ones((1, 2, 3))
    xt = flow.noisy_tokens(x0, noise, jnp.array([[0.0, 0.25]]))
    np.testing.assert_allclose(xt[0, 0], 1.0)
    np.testing.assert_allclose(xt[0, 1], 0.5)
    np.testing.assert_allclose(flow.velocity_target(x0, noise), -2.0)
