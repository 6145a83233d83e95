"""Clip motion: OpenCV Farneback dense optical flow at low resolution on a few frame pairs a second.

The score is the mean flow magnitude in frame short sides per second: a pan that crosses the whole
short side of the frame in one second scores 1.0 at any resolution or frame rate. `motion` is the
mean over frame pairs of the per-pair mean magnitude; `motion_peak` is the largest per-pair 95th
percentile (a small object moving fast shows there while the mean stays low).
Static clips (motion < min_motion) and extreme ones (motion > max_motion) are dropped.
"""

from __future__ import annotations

import cv2
import numpy as np


def flow_pairs(frames: np.ndarray, fps: float, cfg) -> tuple[np.ndarray, float]:
    """Grayscale frame pairs [P, 2, h, w] downscaled to cfg.short_side, and the time between
    the two frames of a pair in seconds. Pairs start every 1/cfg.fps seconds; a pair's frames
    are 1/cfg.pair_fps apart (close, so fast motion stays within the flow's reach)."""
    num = len(frames)
    gap = min(max(1, round(fps / cfg.pair_fps)), num - 1)
    step = max(1, round(fps / cfg.fps))
    starts = np.arange(0, num - gap, step)
    _, h, w, _ = frames.shape
    scale = min(1.0, cfg.short_side / min(h, w)) if cfg.short_side else 1.0
    size = (max(8, round(w * scale)), max(8, round(h * scale)))

    def gray(i):
        return cv2.resize(cv2.cvtColor(frames[i], cv2.COLOR_RGB2GRAY), size,
                          interpolation=cv2.INTER_AREA)

    return np.stack([[gray(i), gray(i + gap)] for i in starts]), gap / fps


def pair_flow(prev: np.ndarray, nxt: np.ndarray, cfg) -> np.ndarray:
    """Farneback flow [h, w, 2] in pixels from grayscale prev to nxt."""
    return cv2.calcOpticalFlowFarneback(prev, nxt, None, cfg.pyr_scale, cfg.levels, cfg.winsize,
                                        cfg.iterations, cfg.poly_n, cfg.poly_sigma, 0)


def clip_motion(frames: np.ndarray, fps: float, cfg) -> dict[str, float]:
    """{"motion", "motion_peak"} of a clip uint8 [T, H, W, 3] at fps; cfg is config.curate.motion.
    A single-frame clip has no motion (0.0)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"clip_motion expects frames [T, H, W, 3], got shape {frames.shape}")
    if fps <= 0:
        raise ValueError(f"clip_motion needs fps > 0, got {fps}")
    if len(frames) < 2:
        return {"motion": 0.0, "motion_peak": 0.0}
    pairs, dt = flow_pairs(frames, fps, cfg)
    norm = min(pairs.shape[2:]) * dt  # pixels -> short sides per second
    means, peaks = [], []
    for prev, nxt in pairs:
        magnitude = np.linalg.norm(pair_flow(prev, nxt, cfg), axis=-1) / norm
        means.append(float(magnitude.mean()))
        peaks.append(float(np.percentile(magnitude, 95)))
    return {"motion": float(np.mean(means)), "motion_peak": float(np.max(peaks))}


def motion_reason(scores: dict[str, float], cfg) -> str:
    """"static", "extreme_motion" or "" for a clip's motion scores."""
    if scores["motion"] < cfg.min_motion:
        return "static"
    if scores["motion"] > cfg.max_motion:
        return "extreme_motion"
    return ""
