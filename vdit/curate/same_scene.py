"""Whether two moments of a video show the same scene up to camera motion, and whether the view
before a shot change comes back soon after it (A-X-A: an object passing close to the camera, a
flash, a door opening and closing in front of the lens), which makes it no shot change.

Views are small grey images (OpenCV area downscale), each the per-pixel median of a few frames
(a flash or strobe frame shorter than half of them does not move it). Two views are compared
after undoing camera motion: for each of a few zoom factors (one of the two magnified about its
centre), OpenCV's phase correlation finds the shift, and the distance is 1 - the normalised
correlation of the overlapping parts (0 = the same picture, ~1 = unrelated), the smallest over
the zooms. A pan, a zoom or shake thus leaves the distance small where a thumbnail compared
pixel to pixel would call the view changed.
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_STD = 2.0  # 0..255 luma: a flatter view (black, a flat wall) has no structure to compare


def grey_views(frames_bgr: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 [T, H, W, 3] BGR -> float32 [T, h, w] grey, min(h, w) = short_side (or less when
    the frames are smaller)."""
    _, h, w, _ = frames_bgr.shape
    scale = min(1.0, short_side / min(h, w))
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    out = np.empty((len(frames_bgr), size[1], size[0]), np.float32)
    for i, frame in enumerate(frames_bgr):
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        out[i] = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    return out


class Views:
    """Per-pixel medians of `window` consecutive grey frames, [start, start + window), computed
    when first asked for."""

    def __init__(self, grey: np.ndarray, window: int):
        self.grey, self.window = grey, max(1, window)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.grey)

    def has(self, start: int) -> bool:
        return 0 <= start and start + self.window <= len(self.grey)

    def at(self, start: int) -> np.ndarray:
        if start not in self._cache:
            self._cache[start] = np.median(self.grey[start:start + self.window], axis=0)
        return self._cache[start]


def _magnified(image: np.ndarray, zoom: float) -> np.ndarray:
    """The centre 1/zoom of image, scaled back to its size (zoom >= 1)."""
    if zoom <= 1.0:
        return image
    h, w = image.shape
    m = np.array([[zoom, 0, (1 - zoom) * w / 2], [0, zoom, (1 - zoom) * h / 2]], np.float32)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def _overlap_correlation(a: np.ndarray, b: np.ndarray, dx: int, dy: int,
                         min_overlap: float) -> float:
    """Normalised correlation of a[y, x] and b[y + dy, x + dx] where both exist (-1 when they
    overlap on less than min_overlap of the frame or either part is flat)."""
    h, w = a.shape
    if abs(dx) >= w or abs(dy) >= h or (w - abs(dx)) * (h - abs(dy)) < min_overlap * h * w:
        return -1.0
    pa = a[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    pb = b[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    pa, pb = pa - pa.mean(), pb - pb.mean()
    sa, sb = float(pa.std()), float(pb.std())
    if sa < MIN_STD or sb < MIN_STD:
        return -1.0
    return float((pa * pb).mean() / (sa * sb))


def distance(a: np.ndarray, b: np.ndarray, zooms=(1.0,), min_overlap: float = 0.3) -> float:
    """1 - the best normalised correlation of grey views a and b [h, w] after undoing a shift
    (phase correlation) and one of `zooms` (b magnified by z > 1, or a by 1 / z for z < 1):
    0 = the same picture, ~1 = unrelated, 2 when either is flat."""
    if float(a.std()) < MIN_STD or float(b.std()) < MIN_STD:
        return 2.0
    h, w = a.shape
    window = cv2.createHanningWindow((w, h), cv2.CV_32F)
    best = -1.0
    for zoom in zooms:
        za, zb = (a, _magnified(b, zoom)) if zoom >= 1 else (_magnified(a, 1 / zoom), b)
        (sx, sy), _ = cv2.phaseCorrelate(za, zb, window)
        for sign in (1, -1):  # which image the shift applies to: try both, keep the better
            dx, dy = int(round(sign * sx)), int(round(sign * sy))
            best = max(best, _overlap_correlation(za, zb, dx, dy, min_overlap))
    return 1.0 - best


def undone(views: Views, start: int, end: int, reach: int, ratio: float, same: float,
           zooms=(1.0,)) -> bool:
    """Whether a change whose transition spans frames [start, end) is no shot change: the views
    just before and just after it are the same scene (distance < `same`), or the change is
    undone within `reach` frames: a view after it that begins within reach frames of `start`
    is nearer to the view just before it than `ratio` times the change, or a view before it that
    ends within reach frames of `end` is that near to the view just after it (A-X-A). Unknown
    (False) where either view would leave the video or is flat (black)."""
    w = views.window
    if not (views.has(start - w) and views.has(end)):
        return False
    before, after = views.at(start - w), views.at(end)
    change = distance(before, after, zooms)
    if change >= 2.0:
        return False
    if change < same:
        return True
    limit = ratio * change
    for j in range(end + 1, min(start + reach, len(views) - w) + 1):
        if distance(before, views.at(j), zooms) < limit:
            return True
    for j in range(start - w - 1, max(0, end - reach - w) - 1, -1):
        if distance(views.at(j), after, zooms) < limit:
            return True
    return False
