"""One decoded segment -> its clips: cuts, then per clip motion, quality and learned scores, drop
reasons and captions. Pure computation; reading files and writing shards is `run.py`'s job.

Each clip becomes a `ClipResult`: its clips.jsonl line (source, frame range, `fps` (the clip's
average), `times` (a variable-rate clip's only: each frame's seconds from its first), `height` and
`width` as decoded (the frame `box` and `vdit encode`'s crop refer to), every score, `kept`, `reason` = the
first failed check or "", `reasons` = all of them) and, when kept, the frames to write (black
borders cropped and resized as `config.curate.output` says). Motion is measured inside the
content box, as the quality scores are.
Checks, in order: too_short, black_border, static, extreme_motion, blurry, dark, bright,
low_contrast, text, then each learned scorer (its name) below its threshold; learned scorers
run only on clips that pass the other checks (their columns are null elsewhere).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from vdit.curate import captions, cuts, motion, scores
from vdit.curate.decode import Segment, target_size
from vdit.data.video_io import resize_video


@dataclasses.dataclass
class VideoItem:
    source: str  # the key in clips.jsonl (path relative to the input folder, or as in the manifest)
    path: str
    caption: str | None = None  # from the manifest


@dataclasses.dataclass
class ClipResult:
    line: dict
    frames: np.ndarray | None  # uint8 [T, H, W, 3] to write when kept, else None


def _cheap_reasons(line: dict, cfg) -> list[str]:
    reasons = ["too_short"] if line["seconds"] < cfg.cuts.min_clip_seconds else []
    quality = scores.quality_reasons(line, cfg.scores)
    reasons += [r for r in quality if r == "black_border"]
    reasons += [r for r in [motion.motion_reason(line, cfg.motion)] if r]
    return reasons + [r for r in quality if r != "black_border"]


def _learned(frames, box, failed: bool, caption, scorers, cfg) -> tuple[dict, list[str]]:
    """Learned scores ({name: value or None}) and their drop reasons. None where the scorer had
    nothing to score (NaN) or was not run: learned models run only on clips that pass every
    cheaper check, as they cost the most."""
    if not scorers:
        return {}, []
    if failed:
        return {s.name: None for s in scorers}, []
    picked = scores.crop_box(frames[scores.sample_indices(len(frames), cfg.frames)], box)
    values, reasons = {}, []
    for s in scorers:
        value = float(s(picked, caption))
        values[s.name] = None if math.isnan(value) else value
        if values[s.name] is not None and value < s.threshold:
            reasons.append(s.name)
    return values, reasons


def output_frames(frames: np.ndarray, box, cfg) -> np.ndarray:
    """A kept clip's frames as written: bars cropped (output.crop_borders), then downscaled so
    min(H, W) <= output.short_side (0 = unchanged)."""
    if cfg.crop_borders:
        frames = scores.crop_box(frames, box)
    height, width = target_size(frames.shape[1], frames.shape[2], cfg.short_side)
    if (height, width) != frames.shape[1:3]:
        frames = resize_video(frames, height, width)
    return np.ascontiguousarray(frames)


def analyse_clip(segment: Segment, item: VideoItem, start: int, end: int, sidecar, cfg,
                 scorers=(), captioner=None) -> ClipResult:
    """The ClipResult of frames [start, end) of a segment; cfg is `config.curate`."""
    frames = segment.frames[start:end]
    start_s, end_s, fps = segment.span(start, end)  # the clip's own rate in a variable-rate video
    line = {"source": item.source, "segment": segment.index, "last_segment": segment.last,
            "start_frame": segment.start_frame + start, "end_frame": segment.start_frame + end,
            "fps": fps, "num_frames": end - start,
            "seconds": (end - start) / fps if segment.times is None else end_s - start_s,
            "height": int(frames.shape[1]), "width": int(frames.shape[2])}
    if segment.times is not None:  # variable rate: each frame's time, so readers need not
        # assume the average rate (rounded to the microsecond: the ledger is JSON)
        line["times"] = [round(float(t), 6) for t in segment.times[start:end] - segment.times[start]]
    quality = scores.clip_scores(frames, cfg.scores)
    # Motion inside the content box: black bars never move, so over the whole frame they would
    # dilute a letterboxed or pillarboxed clip's motion (and its short side would be the bars').
    line.update(motion.clip_motion(scores.crop_box(frames, quality["box"]), fps, cfg.motion))
    line.update(quality)
    caption, origin = captions.original_caption(item.caption, sidecar, start_s, end_s,
                                                where=item.path)
    reasons = _cheap_reasons(line, cfg)
    learned, more = _learned(frames, line["box"], bool(reasons), caption, scorers, cfg.scores)
    line.update(learned)
    reasons += more
    kept = not reasons
    out = output_frames(frames, line["box"], cfg.output) if kept else None
    line.update({"caption": caption, "caption_source": origin,
                 "recaption": captions.recaption(captioner, out, caption) if kept else "",
                 "kept": kept, "reason": reasons[0] if reasons else "", "reasons": reasons})
    return ClipResult(line, out)


def process_segment(segment: Segment, item: VideoItem, sidecar, cfg, scorers=(),
                    captioner=None) -> list[ClipResult]:
    """All clips of a segment (at least one line, so the segment is recorded as done)."""
    boundaries = cuts.detect_boundaries(segment.frames, segment.fps, cfg.cuts)
    ranges = cuts.split_clips(len(segment.frames), boundaries, segment.fps,
                              cfg.cuts.max_clip_seconds, segment.times)
    if not ranges:  # all transition (e.g. a fade-out to the end): one unusable "clip"
        ranges = [(0, len(segment.frames))]
    return [analyse_clip(segment, item, start, end, sidecar, cfg, scorers, captioner)
            for start, end in ranges]
