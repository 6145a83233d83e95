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
larger scales may not reach past it).

Each local maximum of D_k above `min_change` is judged again on grey views with the camera's
motion undone (`same_scene.region_change`: a sub-pixel phase-correlation shift and a zoom,
then the median over regions of 1 - correlation, so an object moving over a few regions does
not count; the camera's shift followed frame by frame, `same_scene.Views.track`, is tried
too, and views it leaves too little in common, a fast pan, that differ as they stand are not
compared): one that D_k's ratio test passed falls when its two sides differ by less than
`aligned_change` there (a flash, an object passing); one that the shots' own change hid (a pan
or a zoom decorrelates thumbnails as much as a dissolve does) stands when it reaches
`aligned_change` and `ratio` times the same measure at `aligned_samples` places within the
shots on each side. A hidden peak at a hard cut that ContentDetector proposes is that cut.

A found change is refined on the frames around it: each frame's place between the two shots'
window medians, alpha in [0, 1] (its projection on the line from one to the other), gives the
middle (the step from 0 to 1 that fits alpha best) and the transition frames: the run with
0.25 < alpha < 0.75 around the middle, widened by as much again on each side and further while
alpha stays beyond the spread of the windows' own frames (a blend's or wipe's faint ends), then
padded by `span_pad` of its length on each side. A hard cut (one step of alpha) stands as
placed only where the thumbnails change in one step, `ratio` times each other step within a
window of it: between near windows a short wipe or blend looks like one step, and a larger
scale, whose windows clear it, places it. Where the shots move (a hidden peak, or the
thumbnails' alpha spreading beyond `motion_spread`, or their span running off), alpha comes
from each frame's correlation with the two views instead, camera motion undone. The smallest
scale whose windows hold the whole transition gives it.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from vdit.curate import same_scene


@dataclasses.dataclass(frozen=True)
class Change:
    frame: int  # first frame of the next shot: the transition's middle
    start: int  # transition frames [start, end)
    end: int
    scale: int  # the scale (frames) that found it
    score: float  # D_k at the peak
    whole: bool = True  # the transition fitted between the scale's windows


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


def _refine(x: np.ndarray, med: np.ndarray, t: int, k: int, w: int, score: float,
            pad_fraction: float) -> tuple[Change, float]:
    """Transition frames and middle from each frame's alpha between the two shots' windows;
    also the spread of the windows' own frames' alpha (high: the shots move)."""
    a, b = med[t - k - w + 1], med[t + k]
    span = np.arange(max(0, t - k), min(len(x), t + k + 1))
    d = b - a
    alpha = np.clip((x[span] - a) @ d / max(float(d @ d), 1e-9), 0, 1)
    own = np.concatenate([(x[t - k - w + 1:t - k + 1] - a) @ d, (x[t + k:t + k + w] - b) @ d])
    spread = 3 * float(own.std()) / max(float(d @ d), 1e-9)
    return _from_alpha(alpha, span, t, k, score, spread, pad_fraction, len(x)), spread


def _refine_aligned(views: same_scene.Views, t: int, k: int, score: float, zooms,
                    pad_fraction: float, step: int) -> Change | None:
    """As `_refine`, with each frame's alpha from its correlation with the grey views before
    and after the change once camera motion is undone: c_b / (c_a + c_b) (a blend or wipe of
    two unrelated pictures correlates with each in proportion to its share), measured every
    `step` frames and interpolated between. None where alpha does not pass from below a
    quarter to above three quarters over t - k .. t + k (the views do not tell the shots
    apart: objects moving over a flat background)."""
    num, w = len(views), views.window
    before, after = views.at(t - k - w + 1), views.at(t + k)

    def measured(picks):
        ca = np.array([same_scene.correlation(before, views.grey[f], zooms) for f in picks])
        cb = np.array([same_scene.correlation(after, views.grey[f], zooms) for f in picks])
        return np.where(ca + cb > 0, cb / np.maximum(ca + cb, 1e-9), 0.5)

    def alpha_of(frames):
        frames = np.asarray(frames)
        picks = np.unique(np.append(frames[::step], frames[-1]))
        alpha = measured(picks)
        # Between picks whose alpha differs by over a quarter, every frame is measured (a
        # hard cut stays one step; interpolated, it would look like a short blend).
        jumps = np.flatnonzero(np.abs(np.diff(alpha)) > 0.25)
        inner = np.setdiff1d(np.concatenate([np.arange(picks[j] + 1, picks[j + 1])
                                             for j in jumps] + [np.zeros(0, int)]), picks)
        if inner.size:
            picks = np.concatenate([picks, inner])
            alpha = np.concatenate([alpha, measured(inner)])
            alpha, picks = alpha[np.argsort(picks)], np.sort(picks)
        return np.interp(frames, picks, alpha)

    span = np.arange(max(0, t - k), min(num, t + k + 1))
    alpha = alpha_of(span)
    if not (alpha[0] < 0.25 and alpha[-1] > 0.75):  # no passage from one view to the other
        return None
    own = np.concatenate([alpha_of(np.arange(t - k - w + 1, t - k + 1)),
                          1 - alpha_of(np.arange(t + k, min(num, t + k + w)))])
    return _from_alpha(alpha, span, t, k, score, 3 * float(own.std()), pad_fraction, num)


def _placed(x, medians, views, t: int, k: int, w: int, score: float, cfg,
            hidden: bool) -> Change:
    """The change found at t at scale k, its frames placed by the thumbnails (`_refine`) where
    the span lies within reach of t and either steps from one shot to the other at one frame
    (a hard cut) or the shots hold still: the peak stood out of them (not `hidden`) and their
    frames' alpha spreads by at most `motion_spread`. Else on the grey views with camera motion
    undone (`_refine_aligned`; once more around the middle found when that lies over a quarter
    of k from t), widened to the thumbnails' span where that lies within reach (they see a
    wipe's first corner that the whole view's correlation misses)."""
    change = _placed_once(x, medians, views, t, k, w, score, cfg, hidden)
    if change.start == change.end and not _one_step(x, change.frame, w, cfg.ratio):
        # Windows this near may lie inside a short wipe or blend, which then looks like one
        # step: a larger scale, whose windows clear it, places it.
        change = dataclasses.replace(change, whole=False)
    return change


def _one_step(x: np.ndarray, m: int, w: int, ratio: float) -> bool:
    """Whether the thumbnails x [T, F] change at frame m in one step, as at a hard cut: the
    step from frame m - 1 to m is `ratio` times each other step within w frames of it (a wipe
    or a blend changes a little every frame)."""
    lo, hi = max(1, m - w), min(len(x), m + w + 1)
    steps = ((x[lo:hi] - x[lo - 1:hi - 1]) ** 2).mean(axis=1)
    others = np.delete(steps, m - lo)
    return others.size == 0 or steps[m - lo] >= ratio * float(others.max())


def _placed_once(x, medians, views, t: int, k: int, w: int, score: float, cfg,
                 hidden: bool) -> Change:
    """`_placed` before the one-step check of a hard cut."""
    vw, zooms, step = views.window, tuple(cfg.zooms), max(1, k // cfg.alpha_points)
    thumb, spread = _refine(x, medians[w], t, k, w, score, cfg.span_pad)
    near = t - 2 * k - w <= thumb.start and thumb.end <= t + 2 * k + w
    still = (not hidden and spread <= cfg.motion_spread) or thumb.start == thumb.end
    if (near and still) or not (views.has(t - k - vw + 1) and views.has(t + k)):
        return thumb
    change = _refine_aligned(views, t, k, score, zooms, cfg.span_pad, step)
    m = change.frame if change is not None else t
    if abs(m - t) > max(1, k // 4) and views.has(m - k - vw + 1) and views.has(m + k):
        change = _refine_aligned(views, m, k, score, zooms, cfg.span_pad, step) or change
    if change is None:
        return thumb
    if near:
        change = dataclasses.replace(change, start=min(change.start, thumb.start),
                                     end=max(change.end, thumb.end))
    return change


def _from_alpha(alpha: np.ndarray, span: np.ndarray, t: int, k: int, score: float,
                spread: float, pad_fraction: float, num: int) -> Change:
    """The change from alpha [len(span)] of frames `span` (0: the shot before, 1: after)."""
    # The middle: the step from shot a to shot b that best fits alpha (robust to motion).
    gain = np.concatenate([[0.0], np.cumsum(alpha - 0.5)])
    i = int(np.argmin(gain[:-1] - gain[-1] + gain[:-1]))  # sum before i of (a-.5) minus after
    middle = int(span[i])
    lo = i
    while lo > 0 and alpha[lo - 1] > 0.25:
        lo -= 1
    hi = i
    while hi < len(span) and alpha[hi] < 0.75:
        hi += 1
    start, end = int(span[0] + lo), int(span[0] + hi)
    if end - start <= 1:  # one step from one shot to the other: a hard cut
        return Change(middle, middle, middle, k, score)
    # alpha 0.25 .. 0.75 is half of a linear blend, less when the shots move (motion keeps
    # the thresholds off 0 and 1): widen by the run on each side to hold the faint ends too,
    # and further while alpha stays beyond the shots' own spread (3 sigma of the windows'
    # frames' alpha): a wipe's first and last frames change a corner only.
    margin = end - start + 1
    spread = max(0.05, spread)
    while lo > 0 and alpha[lo - 1] > spread:
        lo -= 1
    while hi < len(span) - 1 and alpha[hi + 1] < 1 - spread:
        hi += 1
    start, end = min(start - margin, int(span[0] + lo) - 1), max(end + margin, int(span[0] + hi) + 2)
    # Whole: the widened span lies between the scale's windows (else a larger scale's are purer).
    whole = start > t - k and end < t + k
    # A transition's faintest frames (a wipe's first corner, a blend's last few percent) sit
    # in the shots' own noise: pad, so none of them lands in a clip.
    pad = int(np.ceil(pad_fraction * (end - start)))
    return Change(middle, max(0, start - pad), min(num, end + pad), k, score, whole)


def _aligned_peak(views: same_scene.Views, t: int, k: int, known: list[Change], cfg,
                  full: bool = True) -> tuple[float | None, float | None]:
    """(the change at t at scale k with camera motion undone, the same within the shots) as
    `same_scene.region_change` of the views k frames before and after t, and its median at
    `aligned_samples` places on each side of t beyond its reach, in the same shots (the larger
    side; None where no side has two places, or a view is flat or would leave the video, or
    not `full`).
    A pan or zoom in a shot decorrelates its thumbnails as much as a dissolve does; undone, it
    leaves the dissolve standing out."""
    w = views.window
    if not (views.has(t - 1 - k - w + 1) and views.has(t + 1 + k)):
        return None, None
    # The median over t - 1 .. t + 1: a change at one pair of views only (a phase correlation
    # gone astray, a flash in one view) is no peak.
    value = float(np.median([_region_change(views, u, k, cfg) for u in (t - 1, t, t + 1)]))
    if value >= 2.0:  # flat (black), or a fast pan left too little in common: unknown
        return None, None
    if value < cfg.aligned_change or not full:  # the shots' own change is not asked for
        return value, None
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
    return value, (max(bases) if bases else None)


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
            value, base = _aligned_peak(views, t, k, found, cfg, full=not is_strong)
            if value is None:
                stands = is_strong
            elif is_strong:
                stands = value >= cfg.aligned_change
            else:
                stands = value >= cfg.aligned_change and base is not None and (
                    value >= cfg.ratio * base)
            if stands:
                score = float(curves[k][t]) if is_strong else value
                new.append(_placed(x, medians, views, t, k, widths[k], score, cfg,
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
    object passing close to the camera), or the views on its two sides are the same scene."""
    return same_scene.undone(views, change.start, change.end, reach, cfg.return_change,
                             cfg.same_distance, tuple(cfg.zooms))


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
