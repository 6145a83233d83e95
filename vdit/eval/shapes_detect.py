"""Analytic per-frame detectors for the shapes judge: color classes, components, shape features.

No learned weights: a pixel is "colored" when its chroma (max - min of RGB in [0, 1]) clears a
threshold, and takes the palette color with the nearest hue; the synthetic backgrounds are muted
(low chroma) so they fall below it. Objects are connected components of one color class.
Shape features are rotation invariant, measured on the sub-pixel half-maximum contour:
  disc_fill = area / area of the minimum enclosing circle (circle 1, square 0.64, triangle 0.41)
  rect_fill = area / area of the minimum-area rectangle   (circle 0.79, square 1, triangle 0.5)
Those ideal values drift for small or blurred shapes, so the shape is decided by
analysis-by-synthesis: each candidate shape is rendered at the measured size and blur (blur read
from the edge width) and measured the same way; the nearest rendition wins.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import cv2
import numpy as np

from vdit.data.shapes_render import coverage
from vdit.data.synthetic import COLORS, SHAPES


def rgb_hue_chroma(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """frames [..., 3] in [0, 1] -> (hue in degrees [0, 360), chroma in [0, 1]), each [...]."""
    r, g, b = frames[..., 0], frames[..., 1], frames[..., 2]
    mx, mn = frames.max(-1), frames.min(-1)
    chroma = mx - mn
    safe = np.where(chroma > 1e-6, chroma, 1.0)
    hue = np.where(mx == r, (g - b) / safe % 6.0,
                   np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return (hue * 60.0) % 360.0, chroma


def palette_hues() -> np.ndarray:
    """Hue in degrees [len(COLORS)] of each palette color, in COLORS order."""
    rgb = np.asarray(list(COLORS.values()), np.float32) / 255.0
    return rgb_hue_chroma(rgb)[0]


def color_classes(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """frames [T, H, W, 3] in [0, 1] -> (nearest palette index [T, H, W] int8, chroma [T, H, W]).

    The caller thresholds chroma: pixels below it are background whatever their class.
    """
    hue, chroma = rgb_hue_chroma(frames)
    diff = np.abs(hue[..., None] - palette_hues())
    return np.minimum(diff, 360.0 - diff).argmin(-1).astype(np.int8), chroma


class Blob(NamedTuple):
    """The largest component of one color class in one frame."""

    area: float        # pixels
    centroid: tuple[float, float]  # (x, y) in pixels, pixel centers at +0.5
    solidity: float    # area / convex hull area
    features: Features


class Features(NamedTuple):
    """Geometry of a blob's half-maximum contour (see the module docstring)."""

    disc_fill: float
    rect_fill: float
    area: float  # pixels inside the contour
    ramp: float  # edge width: (area above 25% - area above 75% of the peak) / perimeter, pixels


def subpixel_features(soft: np.ndarray, comp: np.ndarray, upsample: int) -> Features | None:
    """Features of the half-maximum contour of `soft` [h, w] around the component `comp` [h, w].

    Both arrays are the blob's padded crop; the soft map is upsampled so small, blurred shapes
    keep their geometry instead of their pixel staircase.
    """
    region = cv2.dilate(comp, np.ones((5, 5), np.uint8))
    peak = float(np.percentile(soft[comp > 0], 90))
    up = cv2.resize(soft * region, None, fx=upsample, fy=upsample,
                    interpolation=cv2.INTER_LINEAR)
    mask = (up >= 0.5 * peak).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours or peak <= 0:
        return None
    pts = max(contours, key=cv2.contourArea).astype(np.float32)
    # Contours run through boundary (sub)pixel centers: grow by half a (sub)pixel.
    perimeter = cv2.arcLength(pts, True)
    area = cv2.contourArea(pts) + 0.5 * perimeter + np.pi / 4
    _, radius = cv2.minEnclosingCircle(pts)
    (_, _), (rw, rh), _ = cv2.minAreaRect(pts)
    spread = float((up >= 0.25 * peak).sum() - (up >= 0.75 * peak).sum())
    return Features(disc_fill=float(area / (np.pi * (radius + 0.5) ** 2)),
                    rect_fill=float(area / ((rw + 1.0) * (rh + 1.0))),
                    area=float(area / upsample**2),
                    ramp=float(spread / max(perimeter, 1.0) / upsample))


def largest_blob(mask: np.ndarray, soft: np.ndarray, min_area: float, max_area: float,
                 upsample: int = 4) -> Blob | None:
    """The largest 8-connected component of a boolean mask [H, W] with min_area <= area <=
    max_area, with its shape features measured on the soft map [H, W] (e.g. the class's chroma);
    None if there is none."""
    count, labels, stats, cents = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    best = int(stats[1:, cv2.CC_STAT_AREA].argmax()) + 1
    area = float(stats[best, cv2.CC_STAT_AREA])
    if not min_area <= area <= max_area:
        return None
    x, y, w, h = (int(stats[best, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP,
                                                 cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    y0, x0 = max(y - 3, 0), max(x - 3, 0)
    crop = np.s_[y0:y + h + 3, x0:x + w + 3]
    comp = (labels[crop] == best).astype(np.uint8)
    contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    hull = cv2.convexHull(max(contours, key=len).astype(np.float32))
    hull_area = cv2.contourArea(hull) + 0.5 * cv2.arcLength(hull, True) + np.pi / 4
    feats = subpixel_features(soft[crop].astype(np.float32), comp, upsample)
    if feats is None:
        return None
    cx, cy = cents[best]
    return Blob(area=area, centroid=(float(cx) + 0.5, float(cy) + 0.5),
                solidity=float(min(area / max(hull_area, 1.0), 1.0)), features=feats)


@functools.lru_cache(maxsize=16384)
def prototype_features(shape: str, radius: float, sigma: float, upsample: int,
                       level: float) -> Features:
    """The Features the judge measures on an ideal upright `shape` of equivalent radius
    `radius` (pixels, anti-aliased like the data) blurred by `sigma`, segmented at `level` x peak."""
    pad = int(np.ceil(2.0 * radius + 3.0 * sigma + 4.0))
    center = np.array([[pad + 0.3, pad + 0.3]], np.float32)  # off-grid, like a random placement
    soft = coverage(shape, radius, 0.0, center, 2 * pad, 2 * pad)[0]
    if sigma > 0:
        soft = cv2.GaussianBlur(soft, (0, 0), sigma)
    comp = (soft >= level * soft.max()).astype(np.uint8)
    return subpixel_features(soft, comp, upsample)


def classify_shape(measured: Features, sigmas: tuple[float, ...], upsample: int = 4,
                   level: float = 0.45) -> tuple[str, float]:
    """Nearest shape by analysis-by-synthesis. Each shape is rendered at the measured size and
    at the candidate blur in `sigmas` whose edge width (ramp) best matches the measured one, then
    measured like the video; the nearest (disc_fill, rect_fill) wins.

    Returns (shape, margin in [0, 1] = 1 - nearest distance / second distance).
    """
    radius = round(max(np.sqrt(measured.area / np.pi), 1.0) * 4) / 4  # quantised: cache hits
    dists = {}
    for name in SHAPES:
        protos = [prototype_features(name, radius, round(s, 2), upsample, level) for s in sigmas]
        proto = min((p for p in protos if p is not None),
                    key=lambda p: abs(p.ramp - measured.ramp))
        dists[name] = float(np.hypot(measured.disc_fill - proto.disc_fill,
                                     measured.rect_fill - proto.rect_fill))
    ranked = sorted(dists, key=dists.get)
    margin = 1.0 - dists[ranked[0]] / max(dists[ranked[1]], 1e-6)
    return ranked[0], margin
