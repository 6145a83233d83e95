"""Spatial tiling for the VAE: run a function on overlapping tiles and blend the seams linearly.

Used for frames too large to encode/decode at once. The tile grid, the blend order (each tile is
blended with the already-blended tile above it, then with the one to its left) and the crop of
each tile to its stride follow diffusers' `AutoencoderKLWan.tiled_encode/tiled_decode`, so tiled
outputs match it too. Arrays are `[B, T, H, W, C]`; all sizes are static Python ints.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

H_AXIS, W_AXIS = 2, 3


def _blend(prev, tile, extent: int, axis: int):
    """The first `extent` rows (axis H) or columns (axis W) of `tile` fade in from the last ones of
    `prev`: weight y/extent on `tile`, 1 - y/extent on `prev`."""
    extent = min(prev.shape[axis], tile.shape[axis], extent)
    if extent <= 0:
        return tile
    shape = [1] * tile.ndim
    shape[axis] = extent
    weight = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape).astype(tile.dtype)
    head = jnp.take(tile, jnp.arange(extent), axis=axis)
    tail = jnp.take(prev, jnp.arange(prev.shape[axis] - extent, prev.shape[axis]), axis=axis)
    mixed = tail * (1 - weight) + head * weight
    rest = jnp.take(tile, jnp.arange(extent, tile.shape[axis]), axis=axis)
    return jnp.concatenate([mixed, rest], axis=axis)


def tiled_map(fn_stacked: Callable, x, tile: tuple[int, int], stride: tuple[int, int],
              blend: tuple[int, int], keep: tuple[int, int], out_hw: tuple[int, int]):
    """Applies a function to tiles of `x` and stitches the results.

    x: [B, T, H, W, C]. Tiles start every `stride` (h, w) pixels of x and are `tile` big (smaller
    at the far edges). `fn_stacked` maps n same-shaped tiles stacked as [n, B, T, h, w, C] to their
    n outputs (e.g. a scan, so only one tile is live at a time and each distinct tile shape, at most
    four, is compiled once). Outputs are blended over `blend` rows/columns, cropped to `keep` (the
    output stride), concatenated, and cropped to `out_hw`.
    """
    height, width = x.shape[H_AXIS], x.shape[W_AXIS]
    grid = [[(i, j) for j in range(0, width, stride[1])] for i in range(0, height, stride[0])]
    crops = {ij: x[:, :, ij[0]:ij[0] + tile[0], ij[1]:ij[1] + tile[1]] for r in grid for ij in r}
    groups: dict[tuple, list] = {}
    for ij, crop in crops.items():
        groups.setdefault(crop.shape, []).append(ij)
    outputs = {}
    for members in groups.values():
        stacked = fn_stacked(jnp.stack([crops[ij] for ij in members]))
        outputs.update({ij: stacked[n] for n, ij in enumerate(members)})
    rows = []
    for r in grid:
        row = []
        for ij in r:
            out = outputs[ij]
            if rows:
                out = _blend(rows[-1][len(row)], out, blend[0], H_AXIS)
            if row:
                out = _blend(row[-1], out, blend[1], W_AXIS)
            row.append(out)
        rows.append(row)
    stitched = jnp.concatenate(
        [jnp.concatenate([t[:, :, :keep[0], :keep[1]] for t in row], axis=W_AXIS) for row in rows],
        axis=H_AXIS)
    return stitched[:, :, :out_hw[0], :out_hw[1]]
