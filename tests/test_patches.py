"""Patchify/unpatchify round trips, positions, feature order, and bad shapes."""

import numpy as np
import pytest

from vdit.models import patches


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 1), (2, 1, 3)])
def test_round_trip_and_positions(patch):
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    tokens, positions = patches.patchify(latents, patch)
    grid = patches.grid_shape(latents.shape, patch)
    assert tokens.shape == (np.prod(grid), np.prod(patch) * 3)
    assert positions.shape == (np.prod(grid), 3) and positions.dtype == np.int32
    assert positions.max(0).tolist() == [g - 1 for g in grid]
    np.testing.assert_array_equal(patches.unpatchify(tokens, grid, patch), latents)


def test_feature_order_is_pt_ph_pw_c():
    latents = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    tokens, positions = patches.patchify(latents, (2, 2, 2))
    # Token 1 is grid cell (t=0, h=0, w=1); its feature (dt=1, dh=0, dw=1, c=2).
    assert positions[1].tolist() == [0, 0, 1]
    feat = ((1 * 2 + 0) * 2 + 1) * 3 + 2
    assert tokens[1, feat] == latents[1, 0, 3, 2]


def test_batched_matches_single_and_works_on_jax():
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    batch = rng.normal(size=(2, 3, 4, 4, 5)).astype(np.float32)
    tok = patches.patchify_batch(jnp.asarray(batch), (1, 2, 2))
    np.testing.assert_array_equal(np.asarray(tok[1]), patches.patchify(batch[1], (1, 2, 2))[0])
    back = patches.unpatchify_batch(tok, (3, 2, 2), (1, 2, 2))
    np.testing.assert_array_equal(np.asarray(back), batch)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="H'=5 is not a positive multiple of the patch size 2"):
        patches.patchify(np.zeros((1, 5, 4, 2)), (1, 2, 2))
    with pytest.raises(ValueError, match="patch_size must be three positive ints"):
        patches.patchify(np.zeros((1, 4, 4, 2)), (2, 2))
    with pytest.raises(ValueError, match="expects \\[T', H', W', C\\]"):
        patches.patchify(np.zeros((4, 4, 2)), (1, 2, 2))
    with pytest.raises(ValueError, match="do not fit grid"):
        patches.unpatchify(np.zeros((7, 12)), (1, 2, 2), (1, 2, 2))
