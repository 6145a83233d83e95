"""Where a shot change found by `gradual.py` starts, ends and has its middle.

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


def placed(x, medians, views, t: int, k: int, w: int, score: float, cfg,
            hidden: bool) -> Change:
    """The change found at t at scale k, its frames placed by the thumbnails (`_refine`) where
    the span lies within reach of t and either steps from one shot to the other at one frame
    (a hard cut) or the shots hold still: the peak stood out of them (not `hidden`) and their
    frames' alpha spreads by at most `motion_spread`. Else on the grey views with camera motion
    undone (`_refine_aligned`; once more around the middle found when that lies over a quarter
    of k from t), widened to the thumbnails' span where that lies within reach (they see a
    wipe's first corner that the whole view's correlation misses)."""
    change = _placed_once(x, medians, views, t, k, w, score, cfg, hidden)
    if change.start == change.end and not one_step(x, change.frame, w, cfg.ratio):
        # Windows this near may lie inside a short wipe or blend, which then looks like one
        # step: a larger scale, whose windows clear it, places it.
        change = dataclasses.replace(change, whole=False)
    return change


def one_step(x: np.ndarray, m: int, w: int, ratio: float) -> bool:
    """Whether the thumbnails x [T, F] change at frame m in one step, as at a hard cut: the
    step from frame m - 1 to m is `ratio` times each other step within w frames of it (a wipe
    or a blend changes a little every frame)."""
    lo, hi = max(1, m - w), min(len(x), m + w + 1)
    steps = ((x[lo:hi] - x[lo - 1:hi - 1]) ** 2).mean(axis=1)
    others = np.delete(steps, m - lo)
    return others.size == 0 or steps[m - lo] >= ratio * float(others.max())


def _placed_once(x, medians, views, t: int, k: int, w: int, score: float, cfg,
                 hidden: bool) -> Change:
    """`placed` before the one-step check of a hard cut."""
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
