"""The synthetic shapes world: the embedded default data set (procedural, nothing downloaded).

Each example is one or more flat colored shapes (circle, square, triangle) moving in a straight
line (left, right, up, down) or standing still over a muted, low-saturation background, with a
caption ("a red circle moving right") and its ground truth. Examples are deterministic functions
of (seed, index) and random access, so `SyntheticShapes` is a Grain-style source.

Example dict:
  video   float32 [T, H, W, 3] in [-1, 1]
  caption str, main object described first (see `vdit.data.shapes_captions`)
  objects list of {"shape", "color", "direction"}; objects[0] is the main (largest) object, drawn
          on top of the others; the other objects are smaller (area <= secondary_scale[1]^2 of
          the main one) and have distinct colors
  fps     float, the frame rate the motion was rendered at
  motion  float, the main object's speed as rendered, in frame short sides per second (the unit
          of vdit/curate/motion.py; 0 for still objects and images)

Motion: speed is in fractions of the frame's short side per second, so the displacement over a
clip is (T - 1) / fps * speed * min(H, W) pixels, the same share of the frame at every size.
A path that would leave the frame is shortened to fit (objects always stay fully inside).
T = 1 is an image: every object's direction is "still" and the caption uses the still wording.
The scene content (colors, shapes, directions, template) depends only on (seed, index), so
`render(index, frames=..., height=..., width=...)` shows the same scene at another size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vdit.data import shapes_render
from vdit.data.shapes_captions import CAPTION_SPLITS, build_caption, template_ids

# Saturated, well-separated hues (~45-80 degrees apart); values are RGB in [0, 255].
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "yellow": (235, 210, 30),
    "green": (20, 200, 60),
    "cyan": (25, 200, 215),
    "blue": (45, 75, 235),
    "purple": (190, 45, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
BACKGROUNDS: tuple[str, ...] = (*shapes_render.BACKGROUND_KINDS, "mixed")
_UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}

# `config.data` keys read by from_config (all optional; defaults are the constructor's).
CONFIG_KEYS = ("frames", "height", "width", "fps", "seed", "num_examples", "speed_range",
               "size_range", "secondary_scale", "max_objects", "background",
               "background_saturation", "background_value", "max_rotation_deg", "caption_split")


def _check_pair(name: str, pair: Sequence[float], low: float, high: float) -> tuple[float, float]:
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, "
                         f"got {tuple(pair)}")
    return float(pair[0]), float(pair[1])


def check_video_shape(frames: int, height: int, width: int) -> None:
    """Frames must be 1 + 4k (k >= 0); height and width positive multiples of 16."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 1 + 4k (1, 5, 9, 17, ...), got {frames}")
    for name, size in (("height", height), ("width", width)):
        if size < 16 or size % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {size}")


class SyntheticShapes:
    """Random-access source of synthetic shape videos; see the module docstring.

    Args:
      frames, height, width: clip size (T = 1 + 4k; H, W multiples of 16; any aspect ratio).
      fps: frame rate the motion is rendered at.
      seed: data seed; example i is a pure function of (seed, i).
      num_examples: length of the source.
      speed_range: (min, max) speed in fractions of min(H, W) per second.
      size_range: (min, max) equivalent radius of the main object (area = pi r^2) in
        fractions of min(H, W).
      secondary_scale: (min, max) radius of each other object relative to the main one.
      max_objects: 1..len(COLORS); each example has uniformly 1..max_objects objects.
      background: "plain", "gradient", "texture" or "mixed" (one of the three per example).
      background_saturation: max HSV saturation of background colors.
      background_value: (min, max) HSV value of background colors.
      max_rotation_deg: squares/triangles get a fixed random rotation in +-this (0: upright).
      caption_split: "train", "heldout" or "all" caption templates.
    """

    def __init__(self, frames: int = 17, height: int = 64, width: int = 64, fps: float = 8.0,
                 seed: int = 0, num_examples: int = 100_000,
                 speed_range: Sequence[float] = (0.15, 0.3),
                 size_range: Sequence[float] = (0.12, 0.18),
                 secondary_scale: Sequence[float] = (0.5, 0.7), max_objects: int = 2,
                 background: str = "mixed", background_saturation: float = 0.2,
                 background_value: Sequence[float] = (0.25, 0.7), max_rotation_deg: float = 0.0,
                 caption_split: str = "train"):
        check_video_shape(frames, height, width)
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if not 1 <= max_objects <= len(COLORS):
            raise ValueError(f"max_objects must be in [1, {len(COLORS)}], got {max_objects}")
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
        if caption_split not in CAPTION_SPLITS:
            raise ValueError(f"caption_split must be one of {CAPTION_SPLITS}, "
                             f"got {caption_split!r}")
        if not 0.0 <= background_saturation <= 1.0:
            raise ValueError(f"background_saturation must be in [0, 1], "
                             f"got {background_saturation}")
        self.frames, self.height, self.width, self.fps = frames, height, width, float(fps)
        self.seed, self.num_examples, self.max_objects = seed, num_examples, max_objects
        self.speed_range = _check_pair("speed_range", speed_range, 0.0, 10.0)
        self.size_range = _check_pair("size_range", size_range, 0.01, 0.3)
        self.secondary_scale = _check_pair("secondary_scale", secondary_scale, 0.1, 1.0)
        self.background = background
        self.background_saturation = float(background_saturation)
        self.background_value = _check_pair("background_value", background_value, 0.0, 1.0)
        self.max_rotation_deg = float(max_rotation_deg)
        self.caption_split = caption_split

    @classmethod
    def from_config(cls, data_cfg) -> SyntheticShapes:
        """Builds from a `config.data` section; reads the keys in CONFIG_KEYS that are present
        (other keys of the section belong to other stages and are ignored)."""
        kwargs = {}
        for key in CONFIG_KEYS:
            if key in data_cfg:
                value = data_cfg[key]
                kwargs[key] = tuple(value) if isinstance(value, list | tuple) else value
        return cls(**kwargs)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        return self.render(index)

    def _rngs(self, index: int) -> tuple[np.random.Generator, ...]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        # Independent streams, so e.g. the caption split never changes the pixels.
        return tuple(np.random.default_rng([self.seed, int(index), k]) for k in range(3))

    def objects(self, index: int, frames: int | None = None) -> list[dict]:
        """Ground truth of example `index` (cheap: no rendering)."""
        scene = self._scene(self._rngs(index)[0])
        still = (self.frames if frames is None else frames) == 1
        return [{"shape": o["shape"], "color": o["color"],
                 "direction": "still" if still else o["direction"]} for o in scene]

    def caption(self, index: int, frames: int | None = None) -> str:
        """Caption of example `index` (cheap: no rendering)."""
        rng = self._rngs(index)[2]
        ids = template_ids(self.caption_split)
        template = ids[int(rng.integers(len(ids)))]
        return build_caption(self.objects(index, frames), template, rng)

    def _scene(self, rng: np.random.Generator) -> list[dict]:
        """Resolution-free scene: per object shape, color, direction and unit random draws."""
        count = int(rng.integers(1, self.max_objects + 1))
        colors = rng.choice(len(COLORS), size=count, replace=False)
        names = list(COLORS)
        scene = []
        for k in range(count):
            scale = 1.0 if k == 0 else rng.uniform(*self.secondary_scale)
            scene.append({
                "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                "color": names[int(colors[k])],
                "direction": DIRECTIONS[int(rng.integers(len(DIRECTIONS)))],
                "radius": rng.uniform(*self.size_range) * scale,
                "speed": rng.uniform(*self.speed_range),
                "angle": rng.uniform(-1, 1) * self.max_rotation_deg,
                "place": rng.uniform(0, 1, size=2),
            })
        return scene

    def _path(self, obj: dict, frames: int, height: int, width: int) -> np.ndarray:
        """Centers [T, 2] (x, y) in pixels; the path is shortened if it would leave the frame."""
        short = min(height, width)
        radius = obj["radius"] * short
        left, right, top, bottom = shapes_render.extents(obj["shape"], radius, obj["angle"])
        margin = 0.02 * short
        ux, uy = _UNIT[obj["direction"]] if frames > 1 else (0, 0)
        travel = obj["speed"] * short * (frames - 1) / self.fps
        lo = np.array([left + margin, top + margin])
        hi = np.array([width - right - margin, height - bottom - margin])
        axis = 0 if ux else 1
        if ux or uy:
            travel = min(travel, max(hi[axis] - lo[axis], 0.0))
            hi[axis] -= travel
        start = lo + obj["place"] * np.maximum(hi - lo, 0.0)
        if ux < 0 or uy < 0:
            start[axis] += travel
        step = np.linspace(0.0, travel, frames, dtype=np.float32)
        return (start[None, :] + step[:, None] * np.array([ux, uy])[None, :]).astype(np.float32)

    def _background(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        kinds = shapes_render.BACKGROUND_KINDS
        kind = kinds[int(rng.integers(len(kinds)))] if self.background == "mixed" \
            else self.background
        return shapes_render.background(kind, rng, height, width, self.background_saturation,
                                        self.background_value)

    def render(self, index: int, frames: int | None = None, height: int | None = None,
               width: int | None = None) -> dict:
        """Example `index`, optionally at another clip size (same scene content)."""
        frames = self.frames if frames is None else frames
        height = self.height if height is None else height
        width = self.width if width is None else width
        check_video_shape(frames, height, width)
        scene_rng, bg_rng, _ = self._rngs(index)
        scene = self._scene(scene_rng)
        video = np.broadcast_to(self._background(bg_rng, height, width),
                                (frames, height, width, 3)).copy()
        short = min(height, width)
        for obj in reversed(scene):  # main object last, on top
            centers = self._path(obj, frames, height, width)
            alpha = shapes_render.coverage(obj["shape"], obj["radius"] * short, obj["angle"],
                                           centers, height, width)[..., None]
            color = np.asarray(COLORS[obj["color"]], np.float32) / 255.0
            video = video * (1.0 - alpha) + color * alpha
        return {
            "video": (video * 2.0 - 1.0).astype(np.float32),
            "caption": self.caption(index, frames),
            "objects": self.objects(index, frames),
            "fps": self.fps,
            "motion": self.motion(index, frames, height, width),
        }

    def motion(self, index: int, frames: int | None = None, height: int | None = None,
               width: int | None = None) -> float:
        """Ground-truth motion of example `index` at that size: the main object's displacement
        over the clip in short sides per second (a path shortened to stay inside the frame
        counts as slower); 0.0 for still objects and single images."""
        frames = self.frames if frames is None else frames
        height = self.height if height is None else height
        width = self.width if width is None else width
        if frames < 2:
            return 0.0
        centers = self._path(self._scene(self._rngs(index)[0])[0], frames, height, width)
        distance = float(np.linalg.norm(centers[-1] - centers[0]))
        return distance / min(height, width) / ((frames - 1) / self.fps)

    def prompt_record(self, index: int, frames: int | None = None) -> dict:
        """{prompt, color, shape, direction} of the main object: one line of an eval prompts file."""
        main = self.objects(index, frames)[0]
        return {"prompt": self.caption(index, frames), **main}
