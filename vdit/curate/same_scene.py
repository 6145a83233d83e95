"""Whether two moments of a video show the same scene up to camera motion, and whether the view
before a shot change comes back soon after it (A-X-A: an object passing close to the camera, a
flash, a door opening and closing in front of the lens), which makes it no shot change; a return
counts when it persists (views in a row, or several pairs of views around the change), since one
of many alignments can match two smooth, low-detail shots by chance.

Views are small grey images (OpenCV area downscale), each the per-pixel median of a few frames
(a flash or strobe frame shorter than half of them does not move it). Two views are compared
after undoing camera motion: for each of a few zoom factors (one of the two magnified about its
centre, then finer zooms around the best one), OpenCV's phase correlation finds the sub-pixel
shift, and the distance is 1 - the normalised correlation of the overlapping parts (0 = the same
picture, ~1 = unrelated), the smallest over the zooms. `region_change` takes the median of that
over a grid of regions instead (an object moving over a few of them does not count).
A pan, a zoom or shake thus leaves the distance small where a thumbnail compared pixel to
pixel would call the view changed. `Views.track` follows the camera's shift frame by frame
(summed phase correlations of consecutive frames): a pan too fast for one phase correlation
between far views is measured whole.
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
        self._steps: np.ndarray | None = None  # cumulative frame-to-frame shifts [T, 2]

    def __len__(self) -> int:
        return len(self.grey)

    def has(self, start: int) -> bool:
        return 0 <= start and start + self.window <= len(self.grey)

    def at(self, start: int) -> np.ndarray:
        if start not in self._cache:
            self._cache[start] = np.median(self.grey[start:start + self.window], axis=0)
        return self._cache[start]

    def track(self, i: int, j: int) -> tuple[float, float]:
        """The camera's shift (sx, sy) in view pixels from frame i to frame j (i <= j), summed
        over consecutive frames' phase correlations: followed frame by frame, a pan too fast
        for one phase correlation between far frames (which then finds a wrong peak) is
        measured whole. grey[j][y + sy, x + sx] ~ grey[i][y, x]."""
        if self._steps is None:
            h, w = self.grey.shape[1:]
            window = cv2.createHanningWindow((w, h), cv2.CV_32F)
            steps = [cv2.phaseCorrelate(a, b, window)[0]
                     for a, b in zip(self.grey[:-1], self.grey[1:])]
            self._steps = np.concatenate([np.zeros((1, 2)), np.cumsum(
                np.reshape(steps, (-1, 2)), axis=0)])
        sx, sy = self._steps[j] - self._steps[i]
        return float(sx), float(sy)


def _magnified(image: np.ndarray, zoom: float) -> np.ndarray:
    """The centre 1/zoom of image, scaled back to its size (zoom >= 1)."""
    if zoom <= 1.0:
        return image
    h, w = image.shape
    m = np.array([[zoom, 0, (1 - zoom) * w / 2], [0, zoom, (1 - zoom) * h / 2]], np.float32)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def _shifted_parts(a: np.ndarray, b: np.ndarray, sx: float, sy: float,
                   min_overlap: float) -> tuple[np.ndarray, np.ndarray] | None:
    """a[y, x] and b[y + sy, x + sx] (b resampled: sub-pixel shifts) where both exist; None when
    they overlap on less than min_overlap of the frame."""
    h, w = a.shape
    x0, x1 = int(np.ceil(max(0.0, -sx))), int(np.floor(min(w - 1.0, w - 1.0 - sx))) + 1
    y0, y1 = int(np.ceil(max(0.0, -sy))), int(np.floor(min(h - 1.0, h - 1.0 - sy))) + 1
    if x1 - x0 < 2 or y1 - y0 < 2 or (x1 - x0) * (y1 - y0) < min_overlap * h * w:
        return None
    m = np.array([[1, 0, sx], [0, 1, sy]], np.float32)  # moved[y, x] = b[y + sy, x + sx]
    moved = cv2.warpAffine(b, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REFLECT)
    return a[y0:y1, x0:x1], moved[y0:y1, x0:x1]


def _correlation(pa: np.ndarray, pb: np.ndarray) -> float:
    """Normalised correlation of two equal-shape float32 parts (-1 when either is flat)."""
    if min(float(cv2.meanStdDev(p)[1][0, 0]) for p in (pa, pb)) < MIN_STD:
        return -1.0
    return float(cv2.matchTemplate(pa, pb, cv2.TM_CCOEFF_NORMED)[0, 0])


def _aligned(a: np.ndarray, b: np.ndarray, zooms, min_overlap: float, enough: float = 1.0,
             hint: tuple[float, float] | None = None
             ) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """(best normalised correlation, a's part, b's part) over `zooms` (b magnified by z > 1,
    or a by 1 / z for z < 1), each after undoing the sub-pixel shift that phase correlation
    finds, then, where a zoom other than 1 did best, over zooms between it and its neighbours
    (two halvings of the finest step between the given zooms: a zoom between them misaligns
    the frame's edges); the parts are the overlapping regions (None where none overlaps
    enough). Stops once a correlation reaches `enough`. A `hint` shift (the camera's, followed
    frame by frame) is tried too, without zoom."""
    h, w = a.shape
    window = cv2.createHanningWindow((w, h), cv2.CV_32F)
    best, parts, best_zoom = -1.0, (None, None), 1.0

    def attempt(zoom: float, shift: tuple[float, float] | None = None) -> None:
        nonlocal best, parts, best_zoom
        za, zb = (a, _magnified(b, zoom)) if zoom >= 1 else (_magnified(a, 1 / zoom), b)
        if shift is None:  # zb[y + sy, x + sx] ~ za[y, x]
            shift, _ = cv2.phaseCorrelate(za, zb, window)
        found = _shifted_parts(za, zb, *shift, min_overlap)
        if found is not None:
            corr = _correlation(*found)
            if corr > best:
                best, parts, best_zoom = corr, found, zoom

    if hint is not None:
        attempt(1.0, hint)
    for zoom in zooms:
        if best >= enough:
            return best, *parts
        attempt(zoom)
    if best >= enough:
        return best, *parts
    logs = np.log(sorted(set(zooms)))
    if len(logs) > 1 and best_zoom != 1.0:  # a zoom beat none: look between the given ones
        step = float(np.min(np.diff(logs)))
        for _ in range(2):
            step /= 2
            centre = best_zoom
            for zoom in (centre * np.exp(step), centre * np.exp(-step)):
                attempt(float(zoom))
            if best >= enough:
                break
    return best, *parts


def distance(a: np.ndarray, b: np.ndarray, zooms=(1.0,), min_overlap: float = 0.3) -> float:
    """1 - the best normalised correlation of grey views a and b [h, w] after undoing a shift
    (phase correlation) and one of `zooms` (b magnified by z > 1, or a by 1 / z for z < 1):
    0 = the same picture, ~1 = unrelated, 2 when either is flat."""
    if float(a.std()) < MIN_STD or float(b.std()) < MIN_STD:
        return 2.0
    return 1.0 - _aligned(a, b, zooms, min_overlap)[0]


def correlation(a: np.ndarray, b: np.ndarray, zooms=(1.0,), min_overlap: float = 0.3,
                enough: float = 0.95) -> float:
    """The best normalised correlation of grey views a and b after undoing camera motion (as
    `distance`; zooms stop once one reaches `enough`), at least 0; 0 when either is flat."""
    if float(a.std()) < MIN_STD or float(b.std()) < MIN_STD:
        return 0.0
    return max(0.0, _aligned(a, b, zooms, min_overlap, enough)[0])


def overlaps(a: np.ndarray, b: np.ndarray, shift: tuple[float, float],
             min_overlap: float = 0.3) -> bool:
    """Whether views a and b [h, w], b shifted by `shift`, share min_overlap of the frame."""
    return _shifted_parts(a, b, *shift, min_overlap) is not None


def region_change(a: np.ndarray, b: np.ndarray, zooms=(1.0,), cells: int = 4,
                  min_overlap: float = 0.3, hint: tuple[float, float] | None = None) -> float:
    """How much grey view b [h, w] differs from a once camera motion is undone, region by
    region: the overlap (after the shift and zoom that correlate best) cut into cells x cells
    parts, the median over the parts with structure (std at least half the overlap's, in both
    views) of 1 - their normalised correlation: 0 = the same picture, ~1 = unrelated; an object
    moving over a few parts does not move it. 2 when either view is flat. A `hint` shift (the
    camera's, followed frame by frame) is tried besides the phase correlation's."""
    if float(a.std()) < MIN_STD or float(b.std()) < MIN_STD:
        return 2.0
    return _regions(*_aligned(a, b, zooms, min_overlap, hint=hint), cells)


def compare(a: np.ndarray, b: np.ndarray, zooms=(1.0,)) -> tuple[float, float]:
    """(`distance`, `region_change`) of grey views a and b from one alignment (both 2.0 when
    either view is flat)."""
    if float(a.std()) < MIN_STD or float(b.std()) < MIN_STD:
        return 2.0, 2.0
    best, pa, pb = _aligned(a, b, zooms, 0.3)
    return 1.0 - best, _regions(best, pa, pb)


def _regions(best: float, pa: np.ndarray | None, pb: np.ndarray | None,
             cells: int = 4) -> float:
    """`region_change` of two aligned parts [h, w] (None: no overlap) whose whole correlate
    `best`."""
    if pa is None:
        return 1.0
    h, w = pa.shape
    floor_a, floor_b = max(MIN_STD, 0.5 * float(pa.std())), max(MIN_STD, 0.5 * float(pb.std()))
    ys, xs = np.linspace(0, h, cells + 1).astype(int), np.linspace(0, w, cells + 1).astype(int)
    out = []
    for y0, y1 in zip(ys[:-1], ys[1:]):
        for x0, x1 in zip(xs[:-1], xs[1:]):
            ca, cb = pa[y0:y1, x0:x1], pb[y0:y1, x0:x1]
            ca, cb = ca - ca.mean(), cb - cb.mean()
            sa, sb = float(ca.std()), float(cb.std())
            if sa >= floor_a and sb >= floor_b:
                out.append(1.0 - float((ca * cb).mean() / (sa * sb)))
    return float(np.median(out)) if out else 1.0 - best


def _run_of(flags, count: int, need: int) -> bool:
    """Whether `count` lazily computed flags hold `need` (at most count) True in a row."""
    need, run = max(1, min(need, count)), 0
    for flag in flags:
        run = run + 1 if flag else 0
        if run >= need:
            return True
    return False


def undone(views: Views, start: int, end: int, reach: int, ratio: float, same: float,
           zooms=(1.0,), return_views: int = 2, return_pairs: int = 2) -> bool:
    """Whether a change whose transition spans frames [start, end) is no shot change: the views
    just before and just after it are the same scene (distance < `same`), or the change is
    undone within `reach` frames: `return_views` consecutive views after it that begin within
    reach frames of `start` are nearer to the view just before it than `ratio` times the change,
    or as many consecutive views before it that end within reach frames of `end` are that near
    to the view just after it (A-X-A), or (a change of at most reach frames) `return_pairs`
    pairs of views on its two sides within reach of it are (see below). Each count is capped
    at the views or pairs there are. Unknown (False) where either view would leave the video or
    is flat (black).
    Returns must persist: each comparison is the best of many alignments (shifts, zooms), and
    on smooth, low-detail pictures one of them can match two different shots by chance; a
    scene that really came back matches in view after view."""
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
    later = range(end + 1, min(start + reach, len(views) - w) + 1)
    if _run_of((distance(before, views.at(j), zooms) < limit for j in later), len(later),
               return_views):
        return True
    earlier = range(start - w - 1, max(0, end - reach - w) - 1, -1)
    if _run_of((distance(views.at(j), after, zooms) < limit for j in earlier), len(earlier),
               return_views):
        return True
    # An occluder entering and leaving (within reach frames) is often found as two changes
    # (A-X, X-A) merged into one whose frames hold only part of it: views B up to `reach`
    # frames before it and views A up to `reach` frames after it (a few on each side) undo
    # it too, when they are that near, or `ratio` times nearer than B is to the farthest view
    # over the change (the excursion: a blend or wipe passes from B to A, never farther from B
    # than A is; an occluder is farther), or their regions are one scene (`region_change` <
    # same: the background on both sides of the occluder is the same shot, whatever else
    # moves in it), in `return_pairs` (B, A) pairs.
    if end - start > reach:
        return False
    stride = max(w, reach // 6)  # a few views on each side: each pair costs an alignment
    befores = [views.at(j) for j in range(start - 2 * w, max(-1, start - w - reach), -stride)]
    afters = [views.at(j) for j in range(end + w, min(end + reach, len(views) - w) + 1, stride)]
    inner = [views.at(j) for j in range(max(0, start - w + 1), min(end, len(views) - w) + 1,
                                        max(1, w // 2))]
    need, hits = max(1, min(return_pairs, len(befores) * len(afters))), 0
    for b in befores:
        away = [d for d in (distance(b, x, zooms) for x in inner) if d < 2.0]  # 2: black
        excursion = max(away, default=0.0)
        for a in afters:
            near, regions = compare(b, a, zooms)
            hits += near < max(limit, ratio * excursion) or regions < same
            if hits >= need:
                return True
    return False
