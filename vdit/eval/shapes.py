"""Prompt adherence on the synthetic shapes data: judge a video's main object, score a run.

`judge_video` recovers the color, shape and motion direction of the main (largest) object from the
pixels alone, with the analytic detectors of `shapes_detect` (no learned weights):
  1. light Gaussian smoothing (tolerates noise), then per-pixel palette color classes;
  2. per frame and color class, the largest component; the class with the largest total area
     over the clip is the main object;
  3. the object is accepted only if it is a compact blob (solidity), of plausible size, present
     in most frames, in frames that are not mostly colored (pure noise is), and — for videos —
     its size and track are temporally consistent; otherwise everything is "none";
  4. shape = nearest prototype of the median (disc_fill, rect_fill) features;
  5. direction from a least-squares fit of the centroid track: "still" when the fitted
     displacement over the clip is below `still_threshold` x min(H, W), else the dominant axis.
A single frame (T = 1) has direction None (not scored).

`score` turns predictions + targets into accuracies; `eval_shapes_dir` runs a folder of generated
videos against a prompts jsonl (what `vdit eval shapes` calls).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike

import cv2
import numpy as np

from vdit import runs
from vdit.data.synthetic import COLORS, DIRECTIONS, SHAPES
from vdit.data.video_io import VideoReadError, read_video
from vdit.eval.shapes_detect import Features, classify_shape, color_classes, largest_blob

NONE = "none"


@dataclass(frozen=True)
class JudgeConfig:
    """Judge knobs (fractions are of the frame area or of min(H, W))."""

    smooth_sigma: float = 0.8         # Gaussian blur (pixels) before classifying colors
    chroma_threshold: float = 0.3     # min max-min RGB (in [0, 1]) of an object pixel
    min_area_frac: float = 0.008      # object area bounds, fraction of the frame area
    max_area_frac: float = 0.35
    min_area_px: float = 8.0
    min_solidity: float = 0.8         # area / convex hull area of an accepted blob
    max_colored_frac: float = 0.5     # frames with more colored pixels than this are noise
    min_presence: float = 0.6         # fraction of frames where the object must be found
    max_area_spread: float = 0.5      # std / mean of the object's area across frames
    max_track_residual: float = 0.06  # RMS of centroid off a straight line, fraction of min side
    still_threshold: float = 0.03     # fitted clip displacement below this x min side: "still"
    upsample: int = 4                 # sub-pixel factor for shape contours
    # Blurs (pixels, on top of smooth_sigma) that shape prototypes may have; the one matching
    # the measured edge width is used.
    extra_blurs: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
    object_chroma: float = 0.7        # typical object chroma (prototype segmentation level)


def to_unit_float(video: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] uint8 or float in [-1, 1] -> float32 in [0, 1]."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a video [T, H, W, 3], got shape {video.shape}")
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 255.0
    if not np.issubdtype(video.dtype, np.floating):
        raise ValueError(f"expected uint8 or float video, got dtype {video.dtype}")
    return np.clip((video.astype(np.float32) + 1.0) * 0.5, 0.0, 1.0)


def _none(frames: int, reason: str) -> dict:
    return {"color": NONE, "shape": NONE, "direction": NONE if frames > 1 else None,
            "confidence": 0.0, "presence": 0.0, "frames": frames, "reason": reason}


def _direction(centers: np.ndarray, times: np.ndarray, frames: int, short: int,
               cfg: JudgeConfig) -> tuple[str, np.ndarray, float]:
    """(direction, fitted displacement over the clip / short, RMS residual / short)."""
    design = np.stack([times, np.ones_like(times)], 1)
    coef, *_ = np.linalg.lstsq(design, centers, rcond=None)
    resid = centers - design @ coef
    rms = float(np.sqrt((resid ** 2).sum(1).mean())) / short
    disp = coef[0] * (frames - 1) / short
    if np.abs(disp).max() < cfg.still_threshold:
        return "still", disp, rms
    if abs(disp[0]) >= abs(disp[1]):
        return ("right" if disp[0] > 0 else "left"), disp, rms
    return ("down" if disp[1] > 0 else "up"), disp, rms


def _frame_blobs(frames01: np.ndarray, cfg: JudgeConfig):
    """Per color class, the per-frame largest valid blob (or None); frames01 [T, H, W, 3]."""
    classes, chroma = color_classes(frames01)
    colored = chroma >= cfg.chroma_threshold
    height, width = classes.shape[1:]
    area = height * width
    lo = max(cfg.min_area_frac * area, cfg.min_area_px)
    hi = cfg.max_area_frac * area
    blobs = {c: [None] * classes.shape[0] for c in range(len(COLORS))}
    for t, frame in enumerate(classes):
        if colored[t].mean() > cfg.max_colored_frac:
            continue
        for c in np.unique(frame[colored[t]]):
            mask = (frame == c) & colored[t]
            if mask.sum() < lo:
                continue
            soft = np.where(frame == c, chroma[t], 0.0)
            blob = largest_blob(mask, soft, lo, hi, cfg.upsample)
            if blob is not None and blob.solidity >= cfg.min_solidity:
                blobs[int(c)][t] = blob
    return blobs


def judge_video(video: np.ndarray, cfg: JudgeConfig = JudgeConfig()) -> dict:
    """Main object of a video [T, H, W, 3] (uint8, or float in [-1, 1]).

    Returns {color, shape, direction, confidence, presence, frames, ...}; color/shape/direction
    are "none" when no object is found (direction is None when T == 1).
    """
    frames01 = to_unit_float(video)
    num, height, width, _ = frames01.shape
    if cfg.smooth_sigma > 0:
        frames01 = np.stack([cv2.GaussianBlur(f, (0, 0), cfg.smooth_sigma) for f in frames01])
    blobs = _frame_blobs(frames01, cfg)
    totals = {c: sum(b.area for b in seq if b is not None) for c, seq in blobs.items()}
    best = max(totals, key=totals.get)
    found = [(t, b) for t, b in enumerate(blobs[best]) if b is not None]
    presence = len(found) / num
    if not found or presence < cfg.min_presence:
        return _none(num, "no consistent colored blob")
    areas = np.array([b.area for _, b in found])
    if num > 1 and areas.std() / areas.mean() > cfg.max_area_spread:
        return _none(num, "blob size not consistent over time")
    measured = Features(*np.median([b.features for _, b in found], axis=0).tolist())
    sigmas = tuple(float(np.hypot(cfg.smooth_sigma, b)) for b in cfg.extra_blurs)
    shape, margin = classify_shape(measured, sigmas, cfg.upsample,
                                   cfg.chroma_threshold / cfg.object_chroma)
    result = {"color": list(COLORS)[best], "shape": shape, "direction": None,
              "confidence": float(presence * (0.5 + 0.5 * margin)), "presence": presence,
              "frames": num, "area_frac": float(areas.mean() / (height * width)),
              "reason": "ok"}
    if num > 1:
        if len(found) < 2:
            return _none(num, "object found in a single frame")
        centers = np.array([b.centroid for _, b in found], np.float64)
        times = np.array([t for t, _ in found], np.float64)
        direction, disp, rms = _direction(centers, times, num, min(height, width), cfg)
        if rms > cfg.max_track_residual:
            return _none(num, "object track is not a straight path")
        result.update(direction=direction, displacement=(float(disp[0]), float(disp[1])))
    return result


def score(predictions: Sequence[dict], targets: Sequence[dict]) -> dict:
    """Accuracies of predictions against targets ({color, shape, direction}, main object).

    Direction is scored only where the target has one and the prediction's video has more than
    one frame. "all" needs every scored field right. Also reports the share of "none" answers.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    hits = {"color": 0, "shape": 0, "direction": 0, "all": 0}
    scored_dir = none = 0
    for pred, tgt in zip(predictions, targets, strict=True):
        ok_color = pred.get("color") == tgt["color"]
        ok_shape = pred.get("shape") == tgt["shape"]
        ok = ok_color and ok_shape
        if tgt.get("direction") is not None and pred.get("frames", 2) > 1:
            scored_dir += 1
            ok_dir = pred.get("direction") == tgt["direction"]
            hits["direction"] += ok_dir
            ok = ok and ok_dir
        hits["color"] += ok_color
        hits["shape"] += ok_shape
        hits["all"] += ok
        none += pred.get("color") == NONE
    n = max(len(targets), 1)
    return {"color": hits["color"] / n, "shape": hits["shape"] / n,
            "direction": hits["direction"] / max(scored_dir, 1), "all": hits["all"] / n,
            "none_rate": none / n, "count": len(targets), "direction_count": scored_dir}


def format_table(scores: dict) -> str:
    """A small plain-text table of a `score` result."""
    rows = [("metric", "value")] + [(k, f"{scores[k]:.3f}") for k in
                                    ("color", "shape", "direction", "all", "none_rate")]
    rows += [(k, str(scores[k])) for k in ("count", "direction_count", "unreadable")
             if k in scores]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _check_target(record: dict, where: str) -> dict:
    for key, vocab in (("color", tuple(COLORS)), ("shape", SHAPES)):
        if record.get(key) not in vocab:
            raise ValueError(f"{where}: {key} must be one of {vocab}, got {record.get(key)!r}")
    direction = record.get("direction")
    if direction is not None and direction not in DIRECTIONS:
        raise ValueError(f"{where}: direction must be one of {DIRECTIONS} or null, "
                         f"got {direction!r}")
    if not record.get("file"):
        raise ValueError(f"{where}: missing 'file'")
    return record


def read_prompts(prompts_file: str | PathLike) -> list[dict]:
    """Lines {file, prompt, color, shape, direction} of a prompts jsonl, validated."""
    path = runs.user_path(prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            records.append(_check_target(record, f"{path}:{n}"))
    if not records:
        raise ValueError(f"prompts file {path} has no records")
    return records


def eval_shapes_dir(videos_dir: str | PathLike | None, prompts_file: str | PathLike,
                    cfg: JudgeConfig = JudgeConfig()) -> dict:
    """Judges every video listed in prompts_file and scores it against its line.

    A relative `file` is looked up next to the jsonl first, then under videos_dir. Unreadable or
    missing videos count as "none" answers (wrong) and are counted in `unreadable`.
    Returns {"scores": score(...) + unreadable, "items": per-video records with "pred"}.
    """
    prompts_file = runs.user_path(prompts_file)
    records = read_prompts(prompts_file)
    roots = [prompts_file.parent] + ([runs.user_path(videos_dir)] if videos_dir is not None else [])
    preds, items, unreadable = [], [], 0
    for record in records:
        candidates = [runs.user_path(record["file"])] if runs.is_absolute(record["file"]) else \
            [root / record["file"] for root in roots]
        path = next((p for p in candidates if p.is_file()), candidates[0])
        try:
            with runs.local_copy(path) as local:  # PyAV reads local files
                pred = judge_video(read_video(local))
        except (VideoReadError, FileNotFoundError) as e:
            unreadable += 1
            pred = {**_none(2, f"unreadable: {e}"), "frames": 2}
        preds.append(pred)
        items.append({**record, "pred": pred})
    scores = score(preds, records)
    scores["unreadable"] = unreadable
    return {"scores": scores, "items": items}
