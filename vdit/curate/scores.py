"""Per-clip quality scores from pixels: black borders, sharpness, brightness, contrast, text.

All are measured on `cfg.frames` evenly spaced frames of the clip. Black borders (letterbox or
pillarbox bars) are found first; the other scores look only inside the content box, downscaled
to `cfg.short_side` when larger (so sharpness compares across source resolutions).
  border_*     rows/columns of black bar at each edge, as fractions of the frame height/width
  border       fraction of the frame area the bars cover
  sharpness    variance of the Laplacian of luma (0..255 scale); blur lowers it
  brightness   mean luma / 255;  contrast: std of luma / 255
  text         share of the frame width covered by text-line-like edge clusters in the top or
               bottom band (burned-in subtitles, captions, lettering): an edge-density heuristic
`quality_reasons` turns them into drop reasons with the thresholds of `config.curate.scores`.
"""

from __future__ import annotations

import cv2
import numpy as np


def sample_indices(num_frames: int, count: int) -> np.ndarray:
    """`count` evenly spaced frame indices of a clip (all frames when it has fewer)."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")
    return np.unique(np.linspace(0, num_frames - 1, max(1, count)).round().astype(int))


def luma(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def _dark_run(profile: np.ndarray) -> int:
    """Length of the leading run of True."""
    return int(np.argmin(profile)) if not profile.all() else len(profile)


def border_box(frames: np.ndarray, border_luma: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) rows/columns of black bar on frames uint8 [N, H, W, 3]: edge
    lines whose 95th-percentile luma is <= border_luma in every frame. A frame that is dark all
    over has no bars (its content box would be empty): (0, 0, 0, 0)."""
    gray = np.stack([luma(f) for f in frames]).astype(np.float32)
    rows = np.percentile(gray, 95, axis=2).max(axis=0) <= border_luma  # [H]
    cols = np.percentile(gray, 95, axis=1).max(axis=0) <= border_luma  # [W]
    top, bottom = _dark_run(rows), _dark_run(rows[::-1])
    left, right = _dark_run(cols), _dark_run(cols[::-1])
    if top + bottom >= len(rows) or left + right >= len(cols):
        return 0, 0, 0, 0
    return top, bottom, left, right


def crop_box(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = box
    _, h, w, _ = frames.shape
    return frames[:, top:h - bottom, left:w - right]


def downscale(frame: np.ndarray, short_side: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if not short_side or min(h, w) <= short_side:
        return frame
    scale = short_side / min(h, w)
    return cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian of a uint8 grayscale image."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def _text_lines(gray: np.ndarray, cfg) -> np.ndarray:
    """Text-line-like boxes [N, 4] (x, y, w, h) of a grayscale frame: strong local edges
    (morphological gradient >= text_edge) joined horizontally over about half a character
    height, kept where the joined blob is as tall as a character, at least text_min_aspect times
    wider than tall, and dense in edges (>= text_min_fill). Texture and shapes fail the height,
    aspect or density tests; lettering passes them."""
    h = gray.shape[0]
    lo, hi = cfg.text_min_char_height * h, cfg.text_max_char_height * h
    grad = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT,
                            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    edges = (grad >= cfg.text_edge).astype(np.uint8)
    join = cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, round(0.5 * hi)), 1))
    joined = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, join)
    _, _, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    keep = []
    for x, y, w, bh, _ in stats[1:]:
        if lo <= bh <= 1.5 * hi and w >= cfg.text_min_aspect * bh:
            if edges[y:y + bh, x:x + w].mean() >= cfg.text_min_fill:
                keep.append((x, y, w, bh))
    return np.array(keep, np.int64).reshape(-1, 4)


def _cover(boxes: np.ndarray, width: int) -> float:
    covered = np.zeros(width, bool)
    for x, _, w, _ in boxes:
        covered[x:x + w] = True
    return float(covered.mean())


def text_score(gray: np.ndarray, cfg) -> float:
    """Text-overlay score of one grayscale frame: the larger share of the frame width covered
    by text lines centred in the top or in the bottom band."""
    h, w = gray.shape
    band = cfg.text_band * h
    lines = _text_lines(gray, cfg)
    centres = lines[:, 1] + lines[:, 3] / 2
    return max(_cover(lines[centres < band], w), _cover(lines[centres >= h - band], w))


def clip_scores(frames: np.ndarray, cfg) -> dict:
    """Scores of a clip uint8 [T, H, W, 3]; cfg is config.curate.scores. Also returns the
    content box (`box`: top, bottom, left, right) so the writer can crop the bars."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"clip_scores expects uint8 frames [T, H, W, 3], got "
                         f"{frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    picked = frames[sample_indices(len(frames), cfg.frames)]
    box = border_box(picked, cfg.border_luma)
    top, bottom, left, right = box
    grays = [downscale(luma(f), cfg.short_side) for f in crop_box(picked, box)]
    inner = (h - top - bottom) * (w - left - right)
    return {
        "box": [int(v) for v in box],
        "border": float(1.0 - inner / (h * w)),
        "sharpness": float(np.mean([sharpness(g) for g in grays])),
        "brightness": float(np.mean([g.mean() for g in grays]) / 255.0),
        "contrast": float(np.mean([g.std() for g in grays]) / 255.0),
        "text": float(np.median([text_score(g, cfg) for g in grays])),
    }


def quality_reasons(scores: dict, cfg) -> list[str]:
    """Drop reasons ([] = keep) of a clip's scores, in a fixed order."""
    checks = [
        ("black_border", scores["border"] > cfg.max_border),
        ("blurry", scores["sharpness"] < cfg.min_sharpness),
        ("dark", scores["brightness"] < cfg.min_brightness),
        ("bright", scores["brightness"] > cfg.max_brightness),
        ("low_contrast", scores["contrast"] < cfg.min_contrast),
        ("text", scores["text"] > cfg.max_text),
    ]
    return [reason for reason, failed in checks if failed]
