"""Whether the frames across a candidate shot change are a blend (a dissolve) of its two sides.

A dissolve between two unrelated pictures of similar colour can look, region by region and
with camera motion undone, less changed than `gradual.py`'s `aligned_change` asks (its blended
frames keep some of each side's structure in every region). What tells it from the shots' own
change is what its frames are: each one is a*before + b*after + c, a weighted sum of the two
sides, with a falling from ~1 to ~0 (a/(a+b), its alpha) over the change.

`blend_profile` fits that per sampled frame by least squares on the grey views
(`same_scene.grey_views`), each side's view first moved onto the frame as its own camera moved
(for each of a few zooms about the centre and the finer ones between the best and its
neighbours, the shift OpenCV's phase correlation finds; the one that correlates best: in a
blend of unrelated pictures each side correlates with the frame in proportion to its share,
so each side's own alignment wins). It reports per frame the fit (explained variance), the
alpha and the gain of the fit over the better side alone (R^2 of the blend minus the larger
R^2 of either side by itself). `is_blend` asks for a good fit at every frame (`blend_fit`), a
gain of `blend_gain` somewhere (both sides are needed: a lighting change or a flash is one side
re-lit; a pan or an object moving over one background fits either side as well as both) and an
alpha falling from above 3/4 to below 1/4, nowhere climbing back by more than a quarter (an
object crossing or a scene coming back after an occluder climbs back; a blend does not).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from vdit.curate import same_scene

MIN_VALID = 0.3  # share of the frame both moved sides must cover for a fit to count
RISE = 0.25  # alpha climbing back by more than this between two frames: no blend


@dataclasses.dataclass(frozen=True)
class BlendProfile:
    frames: np.ndarray  # int [S]: the sampled frames
    alpha: np.ndarray  # float [S]: the before side's share a / (a + b), clipped to [0, 1]
    fit: np.ndarray  # float [S]: explained variance of the two-side fit (nan: unknown)
    gain: np.ndarray  # float [S]: fit minus the better one-side fit's


def _moved(ref: np.ndarray, zoom: float, sx: float, sy: float) -> tuple[np.ndarray, np.ndarray]:
    """ref [h, w] magnified by zoom about its centre, then read at (x + sx, y + sy): (the moved
    picture, the mask [h, w] bool of pixels that come from inside ref)."""
    h, w = ref.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # moved[y, x] = ref[(y + sy - (1 - zoom) cy) / zoom, (x + sx - (1 - zoom) cx) / zoom]
    m = np.array([[1 / zoom, 0, (sx - (1 - zoom) * cx) / zoom],
                  [0, 1 / zoom, (sy - (1 - zoom) * cy) / zoom]], np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    moved = cv2.warpAffine(ref, m, (w, h), flags=flags, borderMode=cv2.BORDER_REFLECT)
    inside = cv2.warpAffine(np.ones_like(ref), m, (w, h), flags=flags,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return moved, inside > 0.999


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised correlation of two equal-length float vectors (0 when either is flat)."""
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denom if denom > 1e-9 else 0.0


def onto(frame: np.ndarray, ref: np.ndarray, zooms) -> tuple[np.ndarray, np.ndarray, float]:
    """ref [h, w] moved onto frame [h, w] as a camera's zoom and shift would: over `zooms`
    (ref magnified by each about the centre) and then two halvings of the finest step between
    them around the best one, the shift phase correlation finds; the one whose moved picture
    correlates best with frame over the pixels it covers. Returns (moved ref, its mask of
    pixels from inside ref, that correlation)."""
    h, w = frame.shape
    window = cv2.createHanningWindow((w, h), cv2.CV_32F)
    best: tuple[float, float, np.ndarray | None, np.ndarray | None] = (-2.0, 1.0, None, None)

    def attempt(zoom: float) -> None:
        nonlocal best
        scaled, _ = _moved(ref, zoom, 0.0, 0.0)
        (sx, sy), _ = cv2.phaseCorrelate(frame, scaled, window)  # scaled[y+sy, x+sx] ~ frame
        moved, mask = _moved(ref, zoom, sx, sy)
        if mask.mean() < MIN_VALID:
            return
        corr = _correlation(frame[mask], moved[mask])
        if corr > best[0]:
            best = (corr, zoom, moved, mask)

    for zoom in zooms:
        attempt(float(zoom))
    logs = np.log(sorted(set(float(z) for z in zooms)))
    if len(logs) > 1:
        step = float(np.min(np.diff(logs)))
        for _ in range(2):
            step /= 2
            centre = best[1]
            for zoom in (centre * np.exp(step), centre * np.exp(-step)):
                attempt(float(zoom))
    corr, _, moved, mask = best
    if moved is None:
        return np.zeros_like(frame), np.zeros(frame.shape, bool), 0.0
    return moved, mask, corr


def _fit(frame: np.ndarray, before: np.ndarray, after: np.ndarray,
         zooms) -> tuple[float, float, float]:
    """(alpha, fit, gain) of one grey frame as a*before + b*after + c, each side moved onto it
    (`onto`); fit nan where they cover too little of it together or it is flat."""
    a, mask_a, _ = onto(frame, before, zooms)
    b, mask_b, _ = onto(frame, after, zooms)
    mask = mask_a & mask_b
    if mask.mean() < MIN_VALID:
        return 0.5, float("nan"), 0.0
    y, a, b = frame[mask], a[mask], b[mask]
    if float(y.std()) < same_scene.MIN_STD:
        return 0.5, float("nan"), 0.0
    design = np.stack([a, b, np.ones_like(a)], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)
    resid = y - design @ coef
    fit = 1.0 - float(resid.var()) / float(y.var())
    single = max(_correlation(y, a) ** 2, _correlation(y, b) ** 2)
    # Each side's weight in units of the frame's structure (a side's own contrast may differ).
    wa, wb = max(0.0, coef[0]) * float(a.std()), max(0.0, coef[1]) * float(b.std())
    alpha = wa / (wa + wb) if wa + wb > 1e-9 else 0.5
    return float(alpha), fit, fit - single


def blend_profile(views: same_scene.Views, first: int, last: int, before: np.ndarray,
                  after: np.ndarray, zooms, points: int) -> BlendProfile:
    """The two-side fit (`_fit`) of `points` frames spread evenly over frames [first, last]
    of views.grey, between grey views `before` and `after` [h, w], and of every frame between
    the two samples whose alpha crosses 1/2 (where a blend gains most over either side)."""
    frames = np.unique(np.linspace(first, last, points).round().astype(int))
    fits = {int(f): _fit(views.grey[f], before, after, zooms) for f in frames}
    alpha = np.array([fits[int(f)][0] for f in frames])
    for i in np.flatnonzero((alpha[:-1] >= 0.5) & (alpha[1:] < 0.5)):
        for f in range(int(frames[i]) + 1, int(frames[i + 1])):
            fits[f] = _fit(views.grey[f], before, after, zooms)
    frames = np.array(sorted(fits))
    alpha, fit, gain = (np.array(v, np.float64) for v in zip(*(fits[int(f)] for f in frames)))
    return BlendProfile(frames, alpha, fit, gain)


def is_blend(views: same_scene.Views, t: int, k: int, cfg) -> bool:
    """Whether the frames between the views k frames before and after t (as `gradual.py`
    compares them at scale k) are a blend of those two views (see the module docstring);
    cfg is config.curate.cuts.gradual. False where a view would leave the video or too few
    frames can be fitted."""
    w = views.window
    first, last = t - k - w + 1, t + k
    if not (views.has(first) and views.has(last)):
        return False
    points = max(3, 2 * cfg.alpha_points + 1)
    profile = blend_profile(views, t - k, t + k, views.at(first), views.at(last),
                            tuple(cfg.zooms), points)
    known = ~np.isnan(profile.fit)
    if known.sum() < 3:
        return False
    alpha, fit, gain = profile.alpha[known], profile.fit[known], profile.gain[known]
    climb = max((float(alpha[j] - alpha[:j].min()) for j in range(1, len(alpha))), default=0.0)
    return bool(fit.min() >= cfg.blend_fit and gain.max() >= cfg.blend_gain
                and alpha[0] > 0.75 and alpha[-1] < 0.25 and climb <= RISE)
