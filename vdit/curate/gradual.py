"""Shot changes of any length from a per-frame structure curve examined at several time scales.

Each frame becomes a small thumbnail (OpenCV area downscale), every colour channel normalised to
zero mean and unit contrast: a flash, a strobe, a lighting change or a fade's ramp change gain
and offset, not structure, so they barely move it. At scale k (frames) the change at frame t is
  D_k(t) = |med(x[t-k-w+1 .. t-k]) - med(x[t+k .. t+k+w-1])|^2 / (2 * size),
w = max(min_window, k // 2), med the per-feature median over the window (about 1 - correlation
of the two windows' structure; a median, so flash or strobe frames do not move it): a
transition of up to 2k frames centred at t compares the two shots, pure. Continuous change
(pans, zooms, shake, moving objects) raises D_k everywhere alike; a shot change raises it at
one place. So a local maximum of D_k (over +-k) is a boundary when it exceeds `min_change` and
`ratio` times the median of D_k beyond its reach on each side, within the same shot (the larger
of the two sides' medians: both shots' own change; a side too short to tell is left out, and
with both out scale k does not judge), and the scene does not come back: at every larger scale
whose windows reach less than `return_seconds` from it, D_K at the change stays above
`return_change` times its peak and `return_ratio` times the shots' own change at that scale
where that is under half the peak (an object passing close to the camera is an A-X-A pattern,
a shot change is not). Then, on grey views with camera motion undone (`same_scene.py`), a change
is dropped when the views on its two sides are one scene, or the view before it is back within
`return_seconds` (an object passing close to the camera hides the view for a moment, and the
larger scales may not reach past it) and stays back for `return_views` views in a row (or
`return_pairs` pairs of views on its two sides): one chance alignment of two smooth shots is no
return.

Each local maximum of D_k above `min_change` is judged again on grey views with the camera's
motion undone (`same_scene.region_change`: a sub-pixel phase-correlation shift and a zoom,
then the median over regions of 1 - correlation, so an object moving over a few regions does
not count; the camera's shift followed frame by frame, `same_scene.Views.track`, is tried
too, and views it leaves too little in common, a fast pan, that differ as they stand are not
compared): one that D_k's ratio test passed falls when its two sides differ by less than
`aligned_change` there (a flash, an object passing); one that the shots' own change hid (a pan
or a zoom decorrelates thumbnails as much as a dissolve does) stands when it reaches
`aligned_change` and `ratio` times the same measure at `aligned_samples` places within the
shots on each side. Either reaches `aligned_change` at `blend_change` already where the frames
across it are a blend of its two sides (`blend.py`: a dissolve between two unrelated pictures
of similar colour keeps part of each side's structure in every region). A hidden peak at a
hard cut that ContentDetector proposes is that cut.
Where a found change starts and ends: `placement.py`.
"""

from __future__ import annotations

import cv2
import numpy as np

from vdit.curate import blend, same_scene
from vdit.curate.placement import Change, placed


def structure(frames_bgr: np.ndarray, size: int, floor: float) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, size*size*3]: thumbnails, each channel minus its mean
    over its std (at least `floor`, 0..255 units: a flat or black frame stays near zero)."""
    out = np.empty((len(frames_bgr), size * size * 3), np.float32)
    for i, frame in enumerate(frames_bgr):
        thumb = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
        thumb -= thumb.mean(axis=(0, 1))
        thumb /= np.maximum(thumb.std(axis=(0, 1)), floor)
        out[i] = thumb.reshape(-1)
    return out


def width(k: int, cfg) -> int:
    """Frames in each window at scale k: k // 2, at least cfg.min_window."""
    return max(cfg.min_window, k // 2)


def window_medians(x: np.ndarray, w: int) -> np.ndarray:
    """[T - w + 1, F]: row j is the per-feature median of x[j:j+w] (a median, so a flash or
    strobe frame shorter than half the window does not move it)."""
    if len(x) < w:
        return np.zeros((0, x.shape[1]), x.dtype)
    return np.median(np.lib.stride_tricks.sliding_window_view(x, w, axis=0), axis=-1)


def change_curve(med: np.ndarray, num: int, k: int, w: int) -> np.ndarray:
    """D_k(t) for t in [0, num) from window medians of width w (0 where a window would
    leave the video)."""
    t = np.arange(num)
    ok = (t - k - w + 1 >= 0) & (t + k + w - 1 < num)
    t = t[ok]
    out = np.zeros(num, np.float32)
    out[ok] = ((med[t - k - w + 1] - med[t + k]) ** 2).mean(axis=1) / 2
    return out


def _base(curve: np.ndarray, t: int, k: int, w: int, known: list[Change]) -> float | None:
    """The shots' own change at scale k around t: the larger median of D_k on either side
    beyond the reach of a transition at t, where both windows lie in the same shot as t's
    window on that side (between the `known` changes); None when neither side has enough."""
    reach = 2 * k + w  # beyond this, D_k no longer sees a transition of <= 2k frames at t
    lo = max([c.end for c in known if c.end <= t - k - w + 1], default=0)
    hi = min([c.start for c in known if c.start >= t + k + w], default=len(curve))
    sides = [curve[max(0, lo + k + w - 1):max(0, t - reach + 1)],
             curve[t + reach:max(t + reach, hi - k - w + 1)]]
    sides = [s[s > 0] for s in sides]  # 0 = undefined near the ends
    sides = [s for s in sides if s.size >= max(2, w)]
    return max(float(np.median(s)) for s in sides) if sides else None


def _peaks(curve: np.ndarray, k: int, w: int, known: list[Change],
           cfg) -> tuple[list[int], list[int]]:
    """Local maxima of D_k over +-(k + w) above min_change: those above `ratio` times the shots'
    own change, and the others where that is known (to be judged with camera motion undone)."""
    strong, weak = [], []
    for t in np.flatnonzero(curve >= cfg.min_change):
        if curve[t] < curve[max(0, t - k - w):t + k + w + 1].max():
            continue
        base = _base(curve, int(t), k, w, known)
        if base is not None:
            (strong if curve[t] >= cfg.ratio * base else weak).append(int(t))
    return strong, weak


def _returns(change: Change, curves: dict[int, np.ndarray], widths: dict[int, int],
             known: list[Change], reach: int, cfg) -> bool:
    """Whether, at a larger scale whose windows stay within `reach` frames, the two sides of
    the change are alike: D_K at it below return_change times its peak, or below
    return_ratio times the shots' own change at K (the scene came back: A-X-A)."""
    others = [c for c in known if c is not change]
    for big, curve in curves.items():
        if not (change.scale < big and big + widths[big] <= reach and change.frame < len(curve)):
            continue
        value = float(curve[change.frame])
        if value <= 0:  # a window would leave the video: unknown
            continue
        base = _base(curve, change.frame, big, widths[big], others)
        # The shots' own change only tells where it is well below the change (fast pans
        # decorrelate at large scales as much as a shot change does).
        telling = base is not None and base <= 0.5 * change.score
        if value < cfg.return_change * change.score or (
                telling and value < cfg.return_ratio * base):
            return True
    return False


def _aligned_value(views: same_scene.Views, t: int, k: int, cfg) -> float | None:
    """The change at t at scale k with camera motion undone: `same_scene.region_change` of the
    views k frames before and after t (the median over t - 1 .. t + 1: a change at one pair of
    views only, a phase correlation gone astray or a flash in one view, is no peak); None where
    a view would leave the video or is flat (black), or a fast pan left too little in common.
    A pan or zoom in a shot decorrelates its thumbnails as much as a dissolve does; undone, it
    leaves the dissolve standing out."""
    w = views.window
    if not (views.has(t - 1 - k - w + 1) and views.has(t + 1 + k)):
        return None
    value = float(np.median([_region_change(views, u, k, cfg) for u in (t - 1, t, t + 1)]))
    return None if value >= 2.0 else value


def _aligned_base(views: same_scene.Views, t: int, k: int, known: list[Change],
                  cfg) -> float | None:
    """The shots' own change as `_aligned_value` measures it: its median at `aligned_samples`
    places on each side of t beyond its reach, in the same shots (the larger side; None where
    no side has two places)."""
    w = views.window
    reach = 2 * k + w
    lo = max([c.end for c in known if c.end <= t - k - w + 1], default=0)
    hi = min([c.start for c in known if c.start >= t + k + w], default=len(views))
    sides = [np.arange(lo + k + w - 1, t - reach + 1), np.arange(t + reach, hi - k - w + 1)]
    bases = []
    for side in sides:
        side = side[[views.has(u - k - w + 1) and views.has(u + k) for u in side]]
        if side.size < 2:
            continue
        picks = side[np.linspace(0, side.size - 1, min(side.size, cfg.aligned_samples))
                     .round().astype(int)]
        changes = [_region_change(views, u, k, cfg) for u in picks]
        changes = [c for c in changes if c < 2.0]
        if changes:
            bases.append(float(np.median(changes)))
    return max(bases) if bases else None


def _clears(views: same_scene.Views, value: float, t: int, k: int, cfg) -> bool:
    """Whether an aligned change `value` at t (scale k) is large enough to be a shot change:
    at least aligned_change, or at least blend_change where the frames across it are a blend
    of its two sides (`blend.is_blend`: a dissolve between two unrelated pictures of similar
    colour keeps part of each side's structure in every region, so its regions change less
    than a cut's)."""
    if value >= cfg.aligned_change:
        return True
    return value >= cfg.blend_change and blend.is_blend(views, t, k, cfg)


def _region_change(views: same_scene.Views, t: int, k: int, cfg) -> float:
    """`same_scene.region_change` of the views k frames before and after t, with the camera's
    shift between them followed frame by frame as a hint. 2.0 (nothing to compare) where that
    shift leaves them too little in common (a fast pan) and they differ by aligned_change or
    more as they stand (where they do not, the track followed something passing in front)."""
    first, zooms = t - k - views.window + 1, tuple(cfg.zooms)
    a, b, hint = views.at(first), views.at(t + k), views.track(first, t + k)
    if same_scene.overlaps(a, b, hint):
        return same_scene.region_change(a, b, zooms, hint=hint)
    value = same_scene.region_change(a, b, zooms)
    return value if value < cfg.aligned_change else 2.0


def detect_changes(frames_bgr: np.ndarray, fps: float, cfg,
                   proposed: tuple[int, ...] = ()) -> tuple[list[Change], list[int]]:
    """Shot changes of frames uint8 [T, H, W, 3]; cfg is config.curate.cuts.gradual. Also
    returns which of the `proposed` hard cuts (first frames of the next shot, from another
    detector) the structure confirms (see `_confirm`)."""
    num = len(frames_bgr)
    x = structure(frames_bgr, cfg.thumb_size, cfg.contrast_floor)
    reach = max(1, round(cfg.return_seconds * fps))
    scales = sorted({max(1, round(s * fps)) for s in cfg.scales_seconds})
    widths = {k: width(k, cfg) for k in scales}
    medians = {w: window_medians(x, w) for w in set(widths.values())}
    curves = {k: change_curve(medians[widths[k]], num, k, widths[k]) for k in scales}
    views = same_scene.Views(same_scene.grey_views(frames_bgr, cfg.view_size), cfg.min_window)
    found: list[Change] = []
    for k in scales:
        strong, weak = _peaks(curves[k], k, widths[k], found, cfg)
        new = []
        # A hidden peak at a proposed hard cut is that cut, judged as one (`_confirm`).
        weak = [t for t in weak if all(abs(t - f) > k + widths[k] for f in proposed)]
        for t, is_strong in [(t, True) for t in strong] + [(t, False) for t in weak]:
            # Judged again with camera motion undone, where the views allow (not black, not
            # past the ends): a weak peak stands when the change stands out there; a strong
            # one falls when the views on its two sides differ by less than aligned_change
            # (a flash, an object crossing: the scene behind is the same).
            value = _aligned_value(views, t, k, cfg)
            if value is None:
                stands = is_strong
            elif is_strong:
                stands = _clears(views, value, t, k, cfg)
            elif _clears(views, value, t, k, cfg):
                base = _aligned_base(views, t, k, found, cfg)
                stands = base is not None and value >= cfg.ratio * base
            else:
                stands = False
            if stands:
                score = float(curves[k][t]) if is_strong else value
                new.append(placed(x, medians, views, t, k, widths[k], score, cfg,
                                   hidden=not is_strong))
        for change in new:
            # The same change seen at a smaller scale stays when it fitted between that
            # scale's windows (they lie nearer, so motion in the shots blurs its span less).
            near = [c for c in found if _overlaps(c, change, k)]
            if near and all(c.whole for c in near):
                continue
            found = [c for c in found if c not in near] + [change]
    found = [c for c in found if not _returns(c, curves, widths, found, reach, cfg)
             and not _undone(c, views, reach, cfg)]
    # Each proposal is judged within the shots the others and the found changes bound.
    marks = found + [Change(f, f, f, min(scales), 0.0) for f in proposed]
    confirmed = [f for f in proposed if _confirm(f, curves, widths, marks, reach, cfg)
                 and not _undone(Change(f, f, f, min(scales), 0.0), views, reach, cfg)]
    return sorted(found, key=lambda c: c.frame), confirmed


def _undone(change: Change, views: same_scene.Views, reach: int, cfg) -> bool:
    """The view before the change is back within `reach` frames, camera motion undone (an
    object passing close to the camera), in return_views views in a row (or return_pairs pairs
    of views on its two sides), or the views on its two sides are the same scene."""
    return same_scene.undone(views, change.start, change.end, reach, cfg.return_change,
                             cfg.same_distance, tuple(cfg.zooms), cfg.return_views,
                             cfg.return_pairs)


def _confirm(frame: int, curves: dict[int, np.ndarray], widths: dict[int, int],
             known: list[Change], reach: int, cfg) -> bool:
    """A proposed hard cut stands when the structure changes across it at the smallest scale
    (D_k over its frame's neighbours >= min_change and >= cut_ratio times the shots' own
    change: a flash or a light switched on fails) and the scene does not come back."""
    k = min(curves)
    curve = curves[k]
    lo, hi = max(0, frame - 1), min(len(curve), frame + 1)
    if hi <= lo:
        return False
    t = lo + int(np.argmax(curve[lo:hi]))
    base = _base(curve, t, k, widths[k], [c for c in known if abs(c.frame - frame) > k])
    value = float(curve[t])
    if value < cfg.min_change or (base is not None and value < cfg.cut_ratio * base):
        return False
    return not _returns(Change(frame, frame, frame, k, value), curves, widths, known, reach, cfg)


def _overlaps(a: Change, b: Change, k: int) -> bool:
    return abs(a.frame - b.frame) <= k or (a.start < b.end + 1 and b.start < a.end + 1)
