"""The transition suite: synthetic videos with known shot boundaries, for the cut detector's tests
and bench/curate.py.

Shots are procedural and textured so that no single statistic separates them: 1/f colour noise
with gradients and soft blobs, a palette (mean colour, contrast) per shot, sensor noise on every
frame. Four shot types: `still` (a fixed view), `moving` (objects crossing a fixed view),
`panning` (the view slides over a wider texture) and `zooming` (the view scales about a point).
Transitions between two shots: `cut`, `dissolve` (a cross-fade), `fade` (out to black and in
from black), `fade_out` (out to black, then a cut in), `fade_in` (a cut to black, then in from
black) and `wipe` (a soft edge sweeping across). Hard negatives are single shots that must not
be split: `fast_pan`, `shake`, `flash` (single-frame flashes and a strobe), `crossing` (a large
textured object passing close to the camera, covering most or all of the view for a moment),
`slow_zoom` and `lighting` (gradual and sudden light changes).

A `SuiteVideo` carries its frames uint8 [T, H, W, 3], fps and `Transition`s [start, end) (the
frames that belong to neither shot; start == end for a hard cut, whose next shot starts at
`start`). Everything is drawn from a seeded generator, so a suite is reproducible.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import cv2
import numpy as np

SHOT_TYPES = ("still", "moving", "panning", "zooming")
TRANSITION_KINDS = ("cut", "dissolve", "fade", "fade_out", "fade_in", "wipe")
NEGATIVE_KINDS = ("fast_pan", "shake", "flash", "crossing", "slow_zoom", "lighting")
FPS_CHOICES = (24.0, 25.0, 30.0, 60.0)
# (height, width): small and large frames, landscape, portrait, square and wide.
SIZES = ((72, 128), (96, 96), (128, 72), (144, 256), (180, 320), (120, 288), (360, 640),
         (320, 240))
NEGATIVES_PER_KIND = 20  # one false boundary among them is the 5% the issue allows
PIXEL_BUDGET = 3e8  # a video's float32 frames while it is built stay under ~3.6 GB: big frames
# get shorter shots


@dataclasses.dataclass(frozen=True)
class Transition:
    kind: str
    start: int  # first frame that belongs to neither shot (the next shot's first frame, a cut)
    end: int  # first frame of the next shot

    @property
    def middle(self) -> float:
        return (self.start + self.end) / 2 if self.end > self.start else float(self.start)


@dataclasses.dataclass
class SuiteVideo:
    name: str
    kind: str  # a transition kind, or a hard-negative kind
    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    transitions: list[Transition]
    shots: tuple[str, ...] = ()  # shot types, in order


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A natural-looking float32 [height, width, 3] image, zero mean, unit-ish std: 1/f noise
    with correlated channels, a gradient and a few soft blobs."""
    scale = max(1.0, min(height, width) / 96)  # noise generated at <= ~96 px short side
    h, w = max(8, round(height / scale)), max(8, round(width / scale))
    out = np.zeros((h, w, 3), np.float32)
    mix = rng.normal(0, 1, (3, 3)).astype(np.float32) + 1.5 * np.eye(3, dtype=np.float32)
    for sigma in (0.7, 1.5, 3, 6, 12):
        layer = cv2.GaussianBlur(rng.normal(0, 1, (h, w, 3)).astype(np.float32), (0, 0), sigma)
        out += (layer / (layer.std() + 1e-6)) @ mix * sigma ** 0.5
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    out += (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None] * rng.normal(0, 3, 3)
    for _ in range(rng.integers(2, 6)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.08, 0.3) * min(h, w)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out += blob[..., None] * rng.normal(0, 4, 3)
    out = (out - out.mean()) / (out.std() + 1e-6)
    if scale > 1.0:
        out = cv2.resize(out, (width, height), interpolation=cv2.INTER_CUBIC)
        detail = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32),
                                  (0, 0), 0.8)
        out += 0.3 * detail[..., None] / (detail.std() + 1e-6)
    return out


def palette(rng: np.random.Generator, like: tuple | None = None) -> tuple:
    """(mean RGB, contrast) of a shot; `like` gives a similar colour and brightness."""
    if like is not None:
        return like[0] + rng.normal(0, 6, 3), like[1] * rng.uniform(0.85, 1.15)
    return rng.uniform(50, 200, 3), rng.uniform(25, 50)


def _paint(image: np.ndarray, pal: tuple) -> np.ndarray:
    return image * pal[1] + pal[0]


def _crop(big: np.ndarray, cy: float, cx: float, zoom: float, height: int,
          width: int) -> np.ndarray:
    """The height x width view of `big` centred at (cy, cx) in its pixels, magnified by zoom."""
    m = np.array([[zoom, 0, width / 2 - zoom * cx], [0, zoom, height / 2 - zoom * cy]],
                 np.float32)
    return cv2.warpAffine(big, m, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def _views(big: np.ndarray, path: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames float32 [N, height, width, 3] along a camera path [N, 3] of (cy, cx, zoom)."""
    return np.stack([_crop(big, cy, cx, z, height, width) for cy, cx, z in path])


def _objects(rng, frames: np.ndarray, count: int, speed: float) -> np.ndarray:
    """Textured discs moving in straight lines over frames [N, H, W, 3] (in place)."""
    n, h, w, _ = frames.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(count):
        r = rng.uniform(0.1, 0.22) * min(h, w)
        colour = rng.uniform(20, 235, 3).astype(np.float32)
        start = rng.uniform([0, 0], [h, w])
        angle = rng.uniform(0, 2 * np.pi)
        velocity = speed * min(h, w) * np.array([np.sin(angle), np.cos(angle)])
        pattern = 25 * texture(rng, h, w)[..., :1]  # [h, w, 1]
        for i in range(n):
            cy, cx = start + velocity * i
            cy, cx = cy % (h + 2 * r) - r, cx % (w + 2 * r) - r
            mask = np.clip(r - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2), 0, 1.5)[..., None] / 1.5
            frames[i] = frames[i] * (1 - mask) + (colour + pattern) * mask
    return frames


def shot(rng: np.random.Generator, kind: str, frames: int, height: int, width: int,
         fps: float, pal: tuple) -> np.ndarray:
    """One shot float32 [frames, height, width, 3] in 0..255 units (unclipped, no noise)."""
    short = min(height, width)
    if kind == "still":
        return np.repeat(_paint(texture(rng, height, width), pal)[None], frames, axis=0)
    if kind == "moving":
        base = np.repeat(_paint(texture(rng, height, width), pal)[None], frames, axis=0)
        return _objects(rng, base, int(rng.integers(1, 4)), rng.uniform(0.15, 0.4) / fps)
    speed = rng.uniform(0.1, 0.35) * short / fps  # pixels per frame
    angle = rng.uniform(0, 2 * np.pi)
    travel = speed * frames
    big_h, big_w = int(height + travel + 8), int(width + travel + 8)
    big = _paint(texture(rng, big_h, big_w), pal)
    t = np.arange(frames, dtype=np.float32)
    if kind == "panning":
        cy = big_h / 2 + np.sin(angle) * speed * (t - frames / 2)
        cx = big_w / 2 + np.cos(angle) * speed * (t - frames / 2)
        return _views(big, np.stack([cy, cx, np.ones_like(t)], 1), height, width)
    if kind == "zooming":
        rate = rng.choice([-1, 1]) * rng.uniform(0.1, 0.3) / fps  # log-zoom per frame
        zoom = np.exp(rate * (t - t.mean())) * 1.15
        return _views(big, np.stack([np.full_like(t, big_h / 2), np.full_like(t, big_w / 2),
                                     zoom], 1), height, width)
    raise ValueError(f"unknown shot type {kind!r}; expected one of {SHOT_TYPES}")


def _finish(rng, video: np.ndarray) -> np.ndarray:
    """Sensor noise (sigma 2, frames drawn from a bank of 8 noise frames: cheap), then uint8."""
    bank = rng.standard_normal((8, *video.shape[1:]), dtype=np.float32) * 2.0 + 0.5
    for frame in video:
        frame += bank[rng.integers(8)]
    return np.clip(video, 0, 255, out=video).astype(np.uint8)


def _ramp(length: int) -> np.ndarray:
    """Blend weights of the `length` frames strictly between two shots, [length, 1, 1, 1]."""
    return np.linspace(0, 1, length + 2, dtype=np.float32)[1:-1, None, None, None]


def join(rng, a: np.ndarray, b: np.ndarray, kind: str, length: int) -> tuple[np.ndarray, int]:
    """Shot a (its last `length` frames run under the transition) then shot b (its first
    `length` frames run under it, for a dissolve or wipe). Returns (frames, transition length);
    the transition starts at len(a) - length."""
    if kind == "cut":
        return np.concatenate([a, b]), 0
    w = _ramp(length)
    if kind == "dissolve":
        mid = (1 - w) * a[-length:] + w * b[:length]
        return np.concatenate([a[:-length], mid, b[length:]]), length
    if kind == "wipe":
        _, h, wd, _ = a.shape
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:wd].astype(np.float32)
        proj = np.cos(angle) * xx / wd + np.sin(angle) * yy / h
        proj = (proj - proj.min()) / (proj.max() - proj.min())
        soft = 0.08
        mask = np.clip((w * (1 + 2 * soft) - soft - proj[None, ..., None]) / soft + 0.5, 0, 1)
        mid = (1 - mask) * a[-length:] + mask * b[:length]
        return np.concatenate([a[:-length], mid, b[length:]]), length
    hold = int(rng.integers(0, 5))
    black = np.zeros((hold, *a.shape[1:]), np.float32)
    out_ramp = a[-length:] * (1 - w) if kind in ("fade", "fade_out") else np.zeros_like(
        a[-length:])
    in_ramp = b[:length] * w if kind in ("fade", "fade_in") else np.zeros_like(b[:length])
    if kind == "fade_out":
        in_ramp = in_ramp[:0]
    if kind == "fade_in":
        out_ramp = out_ramp[:0]
    if kind not in ("fade", "fade_out", "fade_in"):
        raise ValueError(f"unknown transition {kind!r}; expected one of {TRANSITION_KINDS}")
    mid = np.concatenate([out_ramp, black, in_ramp])
    rest = b[length:] if len(in_ramp) else b
    head = a[:-length] if len(out_ramp) else a
    return np.concatenate([head, mid, rest]), len(mid)


def transition_video(rng, kind: str, shots: tuple[str, str], fps: float, size: tuple,
                     similar: bool, length: int, seconds: float = 2.0) -> SuiteVideo:
    """Two shots of ~`seconds` each joined by a transition of `length` frames."""
    height, width = size
    n = max(8, round(seconds * fps))
    n = max(min(n, int(PIXEL_BUDGET / (2 * height * width * 3)) - length), round(0.8 * fps))
    pal_a = palette(rng)
    pal_b = palette(rng, pal_a if similar else None)
    a = shot(rng, shots[0], n + length, height, width, fps, pal_a)
    b = shot(rng, shots[1], n + length, height, width, fps, pal_b)
    frames, span = join(rng, a, b, kind, length)
    start = len(a) - length if span else len(a)
    if kind in ("fade_in",):  # a cut to black: the transition starts where a ends
        start = len(a)
    name = f"{kind}-{shots[0]}-{shots[1]}-{'similar' if similar else 'different'}-" \
           f"{int(fps)}fps-{height}x{width}-L{span}"
    return SuiteVideo(name, kind, _finish(rng, frames), fps,
                      [Transition(kind, start, start + span)], shots)


def negative_video(rng, kind: str, fps: float, size: tuple, seconds: float = 3.0) -> SuiteVideo:
    """One shot with a hard negative (no boundary)."""
    height, width = size
    n = round(seconds * fps)
    short = min(height, width)
    pal = palette(rng)
    t = np.arange(n, dtype=np.float32)
    if kind == "fast_pan":
        speed = rng.uniform(0.6, 1.2) * short / fps
        angle = rng.uniform(0, 2 * np.pi)
        big = _paint(texture(rng, int(height + speed * n + 8), int(width + speed * n + 8)), pal)
        cy = big.shape[0] / 2 + np.sin(angle) * speed * (t - n / 2)
        cx = big.shape[1] / 2 + np.cos(angle) * speed * (t - n / 2)
        video = _views(big, np.stack([cy, cx, np.ones_like(t)], 1), height, width)
    elif kind == "shake":
        amp = rng.uniform(0.02, 0.05) * short
        big = _paint(texture(rng, int(height * 1.3), int(width * 1.3)), pal)
        jitter = rng.normal(0, amp, (n, 2))
        path = np.stack([big.shape[0] / 2 + jitter[:, 0], big.shape[1] / 2 + jitter[:, 1],
                         1 + rng.normal(0, 0.01, n)], 1)
        video = _views(big, path, height, width)
    elif kind == "slow_zoom":
        big = _paint(texture(rng, height * 2, width * 2), pal)
        zoom = np.exp(np.linspace(0, rng.uniform(0.3, 0.6), n)) * 1.2
        video = _views(big, np.stack([np.full(n, height), np.full(n, width), zoom], 1),
                       height, width)
    else:
        base = shot(rng, str(rng.choice(SHOT_TYPES)), n, height, width, fps, pal)
        video = _negative_event(rng, kind, base, fps)
    return SuiteVideo(f"{kind}-{int(fps)}fps-{height}x{width}-{rng.integers(1 << 30)}", kind,
                      _finish(rng, video), fps, [])


def _negative_event(rng, kind: str, video: np.ndarray, fps: float) -> np.ndarray:
    """A flash/strobe, an object crossing close to the camera or a lighting change on a shot."""
    n, h, w, _ = video.shape
    if kind == "flash":
        for _ in range(int(rng.integers(1, 3))):  # single flashes of 1-2 frames
            at = int(rng.integers(n // 5, 4 * n // 5))
            video[at:at + int(rng.integers(1, 3))] += rng.uniform(80, 160)
        start = int(rng.integers(0, n // 2))  # a strobe: every other few frames for ~0.5 s
        period = int(rng.integers(2, 5))
        for i in range(start, min(n, start + round(0.5 * fps)), period):
            video[i] = video[i] * 1.6 + 60
        return video
    if kind == "crossing":
        r = rng.uniform(0.5, 0.9) * max(h, w)
        frames_across = max(4, round(rng.uniform(0.3, 0.8) * fps))
        at = int(rng.integers(n // 5, max(n // 5 + 1, n - frames_across - n // 5)))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        colour = rng.uniform(10, 120, 3).astype(np.float32)
        # The object's texture moves with it, or (half the time) stays put, like a window
        # sliding over a second view: both are A-X-A, not a shot change.
        reach = int(np.ceil(w + r)) + 1
        pattern = 20 * texture(rng, h, 2 * reach + w)
        attached = rng.random() < 0.5
        cy = h / 2 + rng.uniform(-0.3, 0.3) * h
        for j in range(frames_across):
            cx = -r + (w + 2 * r) * j / (frames_across - 1)
            mask = np.clip((r - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)) / (0.05 * r), 0, 1)
            off = int(round(reach - cx)) if attached else reach
            video[at + j] = video[at + j] * (1 - mask[..., None]) + (
                colour + pattern[:, off:off + w]) * mask[..., None]
        return video
    if kind == "lighting":
        gain = np.ones(n, np.float32)
        tint = np.ones((n, 3), np.float32)
        start = int(rng.integers(n // 5, n // 2))
        length = max(2, round(rng.uniform(0.3, 1.0) * fps))
        end = min(n, start + length)
        target = rng.uniform(0.45, 0.7)
        gain[start:end] = np.linspace(1, target, end - start)
        gain[end:] = target
        tint[start:] = 1 + np.linspace(0, 1, n - start)[:, None] * rng.normal(0, 0.1, 3)
        switch = int(rng.integers(end, n)) if end < n - 2 else n
        gain[switch:] /= target  # a light switched back on: a sudden step
        return video * gain[:, None, None, None] * tint[:, None, None, :]
    raise ValueError(f"unknown hard negative {kind!r}; expected one of {NEGATIVE_KINDS}")


def transition_suite(seed: int = 0, quick: bool = False) -> list[SuiteVideo]:
    """The whole suite as a list (see `iter_suite`)."""
    return list(iter_suite(seed, quick))


def iter_suite(seed: int = 0, quick: bool = False,
               kinds: tuple[str, ...] = ()) -> Iterator[SuiteVideo]:
    """Every transition kind between every ordered pair of shot types, each pair once with
    shots that differ strongly and once with shots of similar colour and brightness; fps and
    frame size cycle through FPS_CHOICES and SIZES, and gradual transitions' lengths are spread
    evenly over 6..36 frames (both ends included) in a drawn order. Then NEGATIVES_PER_KIND
    videos of each hard negative. `quick`: two videos per transition kind and one per hard
    negative (small frames, cycling through the pairs)."""
    rng = np.random.default_rng(seed)
    pairs = list(itertools.product(SHOT_TYPES, SHOT_TYPES))
    order = TRANSITION_KINDS + NEGATIVE_KINDS
    for k, kind in enumerate(TRANSITION_KINDS):
        if kinds and not set(kinds) & set(order[k:]):
            return
        if quick:
            chosen = [(pair, i % 2 == 1)
                      for i, pair in enumerate(pairs[k::len(TRANSITION_KINDS)][:2])]
            lengths = [None] * len(chosen)  # drawn as each video is made
        else:
            chosen = [(pair, similar) for pair in pairs for similar in (False, True)]
            lengths = rng.permutation(np.linspace(6, 36, len(chosen)).round().astype(int))
        for i, ((pair, similar), length) in enumerate(zip(chosen, lengths)):
            fps = FPS_CHOICES[(i + k) % len(FPS_CHOICES)]
            size = SIZES[0] if quick else SIZES[(i + 3 * k) % len(SIZES)]
            if kind == "cut":
                length = 0
            elif length is None:
                length = rng.integers(6, 37)
            video = transition_video(rng, kind, pair, fps, size, similar=similar,
                                     length=int(length), seconds=2.5 if quick else 3.0)
            if not kinds or kind in kinds:
                yield video
    per_kind = 1 if quick else NEGATIVES_PER_KIND
    for k, kind in enumerate(NEGATIVE_KINDS):
        if kinds and not set(kinds) & set(NEGATIVE_KINDS[k:]):
            return
        for i in range(per_kind):
            fps = FPS_CHOICES[i % len(FPS_CHOICES)]
            size = SIZES[0] if quick else SIZES[(i * 3 + 1) % len(SIZES)]
            video = negative_video(rng, kind, fps, size, seconds=2.0 if quick else 3.0)
            if not kinds or kind in kinds:
                yield video
