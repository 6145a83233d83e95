"""Rasterisation for the synthetic shapes world: muted backgrounds and anti-aliased flat shapes.

Everything is numpy, vectorised over frames, colors in [0, 1]. Pixel (row i, col j) covers the
continuous square [j, j+1) x [i, i+1); its center is (j + 0.5, i + 0.5). Shapes are described by an
"equivalent radius" r (area = pi r^2 for every shape) so sizes compare across shapes; coverage is
clip(0.5 - signed_distance, 0, 1), a one-pixel anti-aliasing ramp.
"""

from __future__ import annotations

import cv2
import numpy as np

BACKGROUND_KINDS = ("plain", "gradient", "texture")
_SQRT_PI = float(np.sqrt(np.pi))
# Equilateral triangle of area pi r^2: side = r * sqrt(4 pi / sqrt(3)); circumradius = side / sqrt 3.
_TRI_CIRCUM = float(np.sqrt(4 * np.pi / np.sqrt(3)) / np.sqrt(3))


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """h in degrees, s and v in [0, 1] (broadcastable) -> rgb [..., 3] in [0, 1]."""
    h = np.asarray(h, np.float32) % 360.0
    c = np.asarray(v, np.float32) * np.asarray(s, np.float32)
    x = c * (1 - np.abs((h / 60.0) % 2 - 1))
    m = np.asarray(v, np.float32) - c
    sector = (h // 60).astype(np.int32)
    z = np.zeros_like(c * x)
    c, x = c + z, x + z
    table = [(c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x)]
    rgb = np.zeros(c.shape + (3,), np.float32)
    for k, (r, g, b) in enumerate(table):
        sel = sector == k
        rgb[sel] = np.stack([r[sel], g[sel], b[sel]], -1)
    return rgb + np.asarray(m, np.float32)[..., None]


def polygon(shape: str, radius: float, angle_deg: float) -> np.ndarray | None:
    """Vertices [N, 2] (x, y; y down) around the center; None for a circle (analytic)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.5 * _SQRT_PI * radius
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]], np.float32)
    elif shape == "triangle":
        big = _TRI_CIRCUM * radius
        ang = np.deg2rad([-90.0, 30.0, 150.0])  # apex up (y points down)
        pts = np.stack([np.cos(ang), np.sin(ang)], -1).astype(np.float32) * big
    else:
        raise ValueError(f"unknown shape {shape!r}; expected circle, square or triangle")
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
    return pts @ rot.T


def extents(shape: str, radius: float, angle_deg: float) -> tuple[float, float, float, float]:
    """(left, right, top, bottom) reach of the shape from its center, in pixels (all >= 0)."""
    pts = polygon(shape, radius, angle_deg)
    if pts is None:
        return radius, radius, radius, radius
    return (float(-pts[:, 0].min()), float(pts[:, 0].max()),
            float(-pts[:, 1].min()), float(pts[:, 1].max()))


def coverage(shape: str, radius: float, angle_deg: float, centers: np.ndarray,
             height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage [T, H, W] in [0, 1] of a shape whose center follows centers [T, 2]."""
    dx = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :] - centers[:, 0, None, None]
    dy = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None] - centers[:, 1, None, None]
    pts = polygon(shape, radius, angle_deg)
    if pts is None:
        dist = np.sqrt(dx * dx + dy * dy) - radius
    else:
        # Convex polygon: signed distance ~ max over edges of the distance to the edge's line.
        dist = None
        for a, b in zip(pts, np.roll(pts, -1, axis=0), strict=True):
            ex, ey = b - a
            norm = float(np.hypot(ex, ey))
            nx, ny = ey / norm, -ex / norm  # outward normal for clockwise-on-screen vertices
            d = nx * (dx - a[0]) + ny * (dy - a[1])
            dist = d if dist is None else np.maximum(dist, d)
    return np.clip(0.5 - dist, 0.0, 1.0)


def _muted(rng: np.random.Generator, n: int, max_sat: float, value: tuple[float, float]):
    h = rng.uniform(0, 360, n)
    s = rng.uniform(0, max_sat, n)
    v = rng.uniform(*value, n)
    return hsv_to_rgb(h, s, v)


def background(kind: str, rng: np.random.Generator, height: int, width: int,
               max_saturation: float, value_range: tuple[float, float]) -> np.ndarray:
    """A static muted background [H, W, 3] in [0, 1].

    plain: one color; gradient: a linear blend of two colors along a random angle; texture:
    smooth blobs (a coarse random grid upsampled bicubically) plus faint fine grain.
    Saturation <= max_saturation keeps object colors distinct from the background.
    """
    if kind == "plain":
        return np.broadcast_to(_muted(rng, 1, max_saturation, value_range)[0],
                               (height, width, 3)).astype(np.float32)
    if kind == "gradient":
        c0, c1 = _muted(rng, 2, max_saturation, value_range)
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        proj = np.cos(ang) * xx / width + np.sin(ang) * yy / height
        w = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6))[..., None]
        return (c0 * (1 - w) + c1 * w).astype(np.float32)
    if kind == "texture":
        gh, gw = rng.integers(2, 6, size=2)
        grid = _muted(rng, int(gh * gw), max_saturation, value_range).reshape(gh, gw, 3)
        smooth = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        grain = rng.normal(0.0, 0.015, (height, width, 1)).astype(np.float32)
        return np.clip(smooth + grain, 0.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUND_KINDS}")
