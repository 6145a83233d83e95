"""Shot boundaries: a cascade of PySceneDetect detectors run on decoded frames, and clip splitting.

Three detectors, fed the frames array directly (one decode, no second pass over the file):
  - ContentDetector at the full frame rate finds hard cuts (one large frame-to-frame change).
  - ThresholdDetector at the full frame rate finds fades through black.
  - ContentDetector on frames subsampled to `slow_fps` finds gradual transitions (dissolves):
    spread over many frames their per-frame change is small, but between frames a fraction of a
    second apart it is as large as a hard cut's. Its coarse position is then refined on the
    full-rate scores (the centroid of the elevated change around it), and kept only if that
    change stands out from the change around it (continuous motion also trips it).
Boundaries closer than `merge_seconds` (by position or by their transitions) are merged into
one, preferring the position of fade > cut > dissolve (a fade's dark frames also trip the content
detector, whose position there is less exact), with the union of their transitions (so a fade's
ramps, seen as dissolves, join its dark frames).

A `Boundary` carries the first frame of the next shot (`frame`) and the transition frames
[start, end) that belong to neither shot (empty for a hard cut; the dark frames of a fade; the
blended frames of a dissolve). Clips are the frame ranges between transitions.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from scenedetect.common import FrameTimecode
from scenedetect.detectors import ContentDetector, ThresholdDetector
from scenedetect.stats_manager import StatsManager

KIND_PRIORITY = ("fade", "cut", "dissolve")  # merge order: earlier kinds win


@dataclasses.dataclass(frozen=True)
class Boundary:
    frame: int  # first frame of the next shot (a transition's centre)
    kind: str  # "cut", "fade" or "dissolve"
    start: int  # transition frames [start, end) belong to neither shot
    end: int


def detection_frames(frames: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 RGB [T, H, W, 3] -> BGR (what scenedetect expects), downscaled to short_side."""
    _, h, w, _ = frames.shape
    scale = short_side / min(h, w) if short_side else 1.0
    out = []
    for frame in frames:
        if scale < 1.0:
            frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
        out.append(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return np.stack(out)


def _run(detector, frames_bgr: np.ndarray, fps: float, step: int = 1,
         with_scores: bool = False):
    """Feeds frames[::step] to a detector; returns (cut frame numbers in the original frame
    numbering, the ContentDetector's per-frame score [N] when with_scores else None)."""
    rate = float(fps) / step
    stats = StatsManager() if with_scores else None
    detector.stats_manager = stats  # with stats, ContentDetector also computes edge maps
    cuts = []
    picked = frames_bgr[::step]
    for j, frame in enumerate(picked):
        cuts += detector.process_frame(FrameTimecode(j, fps=rate), frame)
    cuts += detector.post_process(FrameTimecode(len(picked) - 1, fps=rate))
    key = [ContentDetector.FRAME_SCORE_KEY]
    scores = None
    if with_scores:
        scores = np.array([(stats.get_metrics(j, key)[0] or 0.0) if stats.metrics_exist(j, key)
                           else 0.0 for j in range(len(picked))], np.float64)
    return [int(c.frame_num) * step for c in cuts], scores


def _fade_span(brightness: np.ndarray, frame: int, threshold: float) -> tuple[int, int]:
    """The run of dark frames (mean < threshold) around `frame`, as [start, end)."""
    if brightness[frame] >= threshold:
        return frame, frame
    lo, hi = frame, frame + 1
    while lo > 0 and brightness[lo - 1] < threshold:
        lo -= 1
    while hi < len(brightness) and brightness[hi] < threshold:
        hi += 1
    return lo, hi


def _refine_dissolve(scores: np.ndarray, coarse: int, step: int, min_ratio: float,
                     bounds: tuple[int, int]) -> Boundary | None:
    """A transition found at the subsampled rate between frames coarse - step and coarse,
    refined on the full-rate change scores[t] (frame t-1 -> t) inside the shot bounds
    [lo, hi) set by the other detectors; None if it is not one.

    Within the three subsampled intervals around it, the transition is the run of frames whose
    change (above the window's floor) stays over half the peak inside the coarse interval; its
    position is the run's weighted centroid. Continuous motion also trips the subsampled
    detector, but changes as much outside such a run as inside: a transition's mean change must
    be min_ratio times the median change on either side of it (up to four intervals away)."""
    lo, hi = max(bounds[0] + 1, coarse - 2 * step), min(bounds[1], coarse + step + 1)
    inner_lo = max(0, coarse - step + 1 - lo)
    if hi - lo < 2 or inner_lo >= min(coarse + 1, hi) - lo:
        return None
    weight = scores[lo:hi] - scores[lo:hi].min()
    inner = weight[inner_lo:coarse + 1 - lo]
    if inner.max() <= 0:
        return None
    peak = int(np.argmax(inner)) + inner_lo
    above = weight >= 0.5 * weight[peak]
    first, last = peak, peak
    while first > 0 and above[first - 1]:
        first -= 1
    while last + 1 < len(weight) and above[last + 1]:
        last += 1
    start, end = lo + first, lo + last  # transition frames [start, end)
    sides = [scores[max(bounds[0] + 1, coarse - 4 * step):start],
             scores[end + 1:min(bounds[1], coarse + 4 * step + 1)]]
    calm = max((float(np.median(side)) for side in sides if side.size), default=0.0)
    if scores[start:end + 1].mean() < min_ratio * calm:
        return None
    t = np.arange(start, end + 1)
    w = weight[first:last + 1]
    centre = int(round(float((t * w).sum() / w.sum())))
    return Boundary(centre, "dissolve", start, end)


def _shot_bounds(frame: int, primary: list[Boundary], num_frames: int) -> tuple[int, int]:
    """[lo, hi): the frames between the primary boundaries on either side of `frame`."""
    lo = max([b.end for b in primary if b.frame <= frame], default=0)
    hi = min([b.start if b.start > b.frame - 1 else b.frame for b in primary
              if b.frame > frame], default=num_frames)
    return lo, hi


def _gap(a: Boundary, b: Boundary) -> int:
    """Frames between two boundaries' transitions (0 when they touch or overlap)."""
    return max(0, max(a.start, b.start) - min(a.end, b.end))


def _merge(candidates: list[Boundary], merge_frames: int, num_frames: int) -> list[Boundary]:
    """One boundary per transition: in KIND_PRIORITY order, a candidate within merge_frames of
    a kept boundary (by position or by transition) widens that one's transition instead."""
    kept: list[Boundary] = []
    for kind in KIND_PRIORITY:
        for b in sorted((c for c in candidates if c.kind == kind), key=lambda c: c.frame):
            if not 0 < b.frame < num_frames:
                continue
            near = [i for i, k in enumerate(kept)
                    if abs(b.frame - k.frame) <= merge_frames or _gap(b, k) <= merge_frames]
            if not near:
                kept.append(b)
                continue
            k = kept[near[0]]
            kept[near[0]] = dataclasses.replace(k, start=min(k.start, b.start),
                                                end=max(k.end, b.end))
    kept.sort(key=lambda b: b.frame)
    # Transitions of neighbouring boundaries must not overlap.
    out, prev_end = [], 0
    for b in kept:
        start = max(b.start, prev_end)
        out.append(dataclasses.replace(b, start=min(start, b.frame), end=max(b.end, b.frame)))
        prev_end = out[-1].end
    return out


def detect_boundaries(frames: np.ndarray, fps: float, cfg) -> list[Boundary]:
    """Shot boundaries of frames uint8 [T, H, W, 3] at `fps`; cfg is `config.curate.cuts`."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"detect_boundaries expects uint8 frames [T, H, W, 3], got "
                         f"{frames.dtype} {frames.shape}")
    if fps <= 0:
        raise ValueError(f"detect_boundaries needs fps > 0, got {fps}")
    num = len(frames)
    if num < 2:
        return []
    bgr = detection_frames(frames, cfg.short_side)
    min_len = max(1, round(cfg.min_scene_seconds * fps))
    hard, scores = _run(ContentDetector(threshold=cfg.content_threshold, min_scene_len=min_len),
                        bgr, fps, with_scores=True)
    fades, _ = _run(ThresholdDetector(threshold=cfg.fade_threshold, min_scene_len=min_len,
                                      fade_bias=0.0, add_final_scene=True), bgr, fps)
    brightness = bgr.reshape(num, -1).mean(axis=1)
    candidates = [Boundary(f, "cut", f, f) for f in hard]
    candidates += [Boundary(f, "fade", *_fade_span(brightness, f, cfg.fade_threshold))
                   for f in fades]
    merge_frames = max(0, round(cfg.merge_seconds * fps))
    primary = _merge(candidates, merge_frames, num)
    for slow_fps in cfg.slow_fps:
        step = max(1, round(fps / slow_fps))
        if step > 1:
            detector = ContentDetector(threshold=cfg.slow_threshold,
                                       min_scene_len=max(1, round(min_len / step)))
            for coarse in _run(detector, bgr, fps, step)[0]:
                bounds = _shot_bounds(coarse, primary, num)
                found = _refine_dissolve(scores, coarse, step, cfg.dissolve_ratio, bounds)
                candidates += [found] if found is not None else []
    return _merge(candidates, merge_frames, num)


def split_clips(num_frames: int, boundaries: list[Boundary], fps: float,
                max_clip_seconds: float = 0.0) -> list[tuple[int, int]]:
    """Clip frame ranges [start, end) between the transitions; clips longer than
    max_clip_seconds (> 0) are split into equal parts. Empty ranges are left out."""
    edges = [(0, 0)] + [(b.start, b.end) for b in boundaries] + [(num_frames, num_frames)]
    clips = []
    for (_, start), (end, _) in zip(edges[:-1], edges[1:]):
        if end <= start:
            continue
        parts = 1
        if max_clip_seconds > 0:
            parts = max(1, int(np.ceil((end - start) / (max_clip_seconds * fps) - 1e-9)))
        cuts = np.linspace(start, end, parts + 1).round().astype(int)
        clips += [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return clips
