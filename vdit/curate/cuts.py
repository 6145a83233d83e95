"""Shot boundaries: PySceneDetect detectors and a multi-scale structure-change detector run on
decoded frames (one decode, no second pass over the file), and clip splitting.

  - ContentDetector (full frame rate) proposes hard cuts (one large frame-to-frame HSV change);
    one stands only when the structure detector confirms it, more leniently than it finds cuts
    itself (a flash, a strobe or a light switched on changes colour and brightness, not
    structure), and the views on its two sides are not one scene nor the view before it back
    soon after (see `gradual._undone`).
  - ThresholdDetector (full frame rate) finds fades through black; a fade's transition is its run
    of dark frames and the brightness ramps around it, widened by the structure detector's span
    when one overlaps it.
  - `gradual.detect_changes` finds shot changes of any length (cuts, dissolves, wipes, fade
    ramps) as peaks of a thumbnail structure-change curve at several time scales, with the
    frames the transition spans.
Boundaries closer than `merge_seconds`, or whose transitions share frames, are merged into one,
preferring the position of fade > cut > dissolve, with the union of their transitions.

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

from vdit.curate import gradual

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


def _run(detector, frames_bgr: np.ndarray, fps: float) -> list[int]:
    """Feeds every frame to a PySceneDetect detector; returns its cut frame numbers."""
    cuts = []
    for j, frame in enumerate(frames_bgr):
        cuts += detector.process_frame(FrameTimecode(j, fps=float(fps)), frame)
    cuts += detector.post_process(FrameTimecode(len(frames_bgr) - 1, fps=float(fps)))
    return [int(c.frame_num) for c in cuts]


def _fade_span(brightness: np.ndarray, frame: int, threshold: float,
               rise: float) -> tuple[int, int]:
    """The run of dark frames (mean < threshold) around `frame` and the ramps on either side
    (brightness climbing by more than `rise` a frame away from the dark run), as [start, end)."""
    if brightness[frame] >= threshold:
        return frame, frame
    lo, hi = frame, frame + 1
    while lo > 0 and brightness[lo - 1] < threshold:
        lo -= 1
    while hi < len(brightness) and brightness[hi] < threshold:
        hi += 1
    while lo > 0 and brightness[lo - 1] > brightness[lo] + rise:
        lo -= 1
    while hi < len(brightness) and brightness[hi] > brightness[hi - 1] + rise:
        hi += 1
    return lo, hi


def _with_ramps(b: Boundary, brightness: np.ndarray, rise: float, drop: float,
                max_frames: int) -> Boundary:
    """A cut's or fade's transition widened by brightness ramps next to it: the frames before
    it darkening toward it, and after it brightening away from it, by more than `rise` a frame
    (a fade out that never reaches black, then a cut; a cut into a fade in), at most
    `max_frames` of them. A ramp counts only when it dims by at least `drop` of the shot's
    brightness: a shot that slowly darkens (a dimming light, a pan) keeps its frames."""
    if b.kind == "dissolve":
        return b
    lo, hi = b.start, b.end
    while lo >= 2 and b.start - lo < max_frames and brightness[lo - 2] > brightness[lo - 1] + rise:
        lo -= 1
    if lo < b.start and brightness[lo - 1] - brightness[b.start - 1] < drop * brightness[lo - 1]:
        lo = b.start
    while (hi + 1 < len(brightness) and hi - b.end < max_frames
           and brightness[hi + 1] > brightness[hi] + rise):
        hi += 1
    if hi > b.end and brightness[hi] - brightness[b.end] < drop * brightness[hi]:
        hi = b.end
    return dataclasses.replace(b, start=lo, end=hi)


def _overlap(a: Boundary, b: Boundary) -> bool:
    """Whether two boundaries' transitions share frames."""
    return max(a.start, b.start) < min(a.end, b.end)


def _merge(candidates: list[Boundary], merge_frames: int, num_frames: int) -> list[Boundary]:
    """One boundary per transition: in KIND_PRIORITY order (within a kind, the order given: the
    more exact detectors first), a candidate within merge_frames of a kept boundary, or whose
    transition shares frames with its transition, widens that one's transition instead."""
    kept: list[Boundary] = []
    for kind in KIND_PRIORITY:
        for b in (c for c in candidates if c.kind == kind):  # in the order given
            if not 0 < b.frame < num_frames:
                continue
            near = [i for i, k in enumerate(kept)
                    if abs(b.frame - k.frame) <= merge_frames or _overlap(b, k)]
            if not near:
                kept.append(b)
                continue
            k = kept[near[0]]
            if b.end > b.start:  # another hard cut nearby adds no transition frames
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
    hard = _run(ContentDetector(threshold=cfg.content_threshold, min_scene_len=min_len),
                bgr, fps)
    fades = _run(ThresholdDetector(threshold=cfg.fade_threshold, min_scene_len=min_len,
                                      fade_bias=0.0, add_final_scene=True), bgr, fps)
    brightness = bgr.reshape(num, -1).mean(axis=1)
    candidates = [Boundary(f, "cut", f, f) for f in hard]
    candidates += [Boundary(f, "fade", *_fade_span(brightness, f, cfg.fade_threshold,
                                                  cfg.fade_rise))
                   for f in fades]
    changes, confirmed = gradual.detect_changes(bgr, fps, cfg.gradual, tuple(hard))
    # A hard cut of the content detector stands when the structure confirms it (a flash or a
    # light switched on changes luma, not structure); unconfirmed ones are dropped.
    candidates = [c for c in candidates if c.kind != "cut" or c.frame in confirmed]
    candidates += [Boundary(ch.frame, "cut" if ch.end == ch.start else "dissolve", ch.start,
                            ch.end) for ch in changes]
    merge_frames = max(0, round(cfg.merge_seconds * fps))
    merged = _merge(candidates, merge_frames, num)
    ramp_frames = max(0, round(cfg.fade_ramp_seconds * fps))  # 0: no ramps
    ramps = [_with_ramps(b, brightness, cfg.fade_rise, cfg.fade_ramp_drop, ramp_frames)
             for b in merged]
    return _merge(ramps, merge_frames, num)


def split_clips(num_frames: int, boundaries: list[Boundary], fps: float,
                max_clip_seconds: float = 0.0, times: np.ndarray | None = None
                ) -> list[tuple[int, int]]:
    """Clip frame ranges [start, end) between the transitions; clips longer than
    max_clip_seconds (> 0) are split into parts of equal duration. `times` [num_frames + 1]:
    each frame's time and the last's end (a variable-frame-rate segment's `Segment.times`);
    None: frames `1 / fps` apart. Empty ranges are left out."""
    edges = [(0, 0)] + [(b.start, b.end) for b in boundaries] + [(num_frames, num_frames)]
    clips = []
    for (_, start), (end, _) in zip(edges[:-1], edges[1:]):
        if end <= start:
            continue
        parts = 1
        if max_clip_seconds > 0:
            seconds = (end - start) / fps if times is None else times[end] - times[start]
            parts = max(1, int(np.ceil(seconds / max_clip_seconds - 1e-9)))
        if times is None:
            cuts = np.linspace(start, end, parts + 1).round().astype(int)
        else:  # the frame nearest each of the equal-duration cut times
            targets = np.linspace(times[start], times[end], parts + 1)
            cuts = start + np.abs(times[start:end + 1, None] - targets).argmin(0)
        clips += [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return clips
