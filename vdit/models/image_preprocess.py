"""Host-side (numpy) image preprocessing for the CLIP vision encoder, as CLIPImageProcessor does it.

The common path of transformers' CLIPImageProcessor (its PIL backend, which is what runs without
torchvision): resize so the shortest side is `shortest_edge` (the long side becomes
`int(shortest_edge * long / short)`), or to `size` {"height", "width"} exactly, with Pillow's
filter `resample` (bicubic by default) -> center crop
(top = (h - crop_h) // 2) -> `* rescale_factor` in float64 -> float32 -> `(x - mean) / std` in
float32. The resize calls Pillow itself, as the reference does: its two passes each round to uint8,
and which pass runs first depends on the Pillow version and the sizes (Pillow 13 runs the vertical
one first for some downscales), so no re-implementation matches every version. Crops larger than the
resized image (the reference zero-pads) are refused with an error.

Images are channels last: `[H, W, 3]` or `[B, H, W, 3]` uint8, or a list of `[H, W, 3]` of
different sizes. `to_uint8` turns vdit pixels in [-1, 1] into such images the way diffusers'
image processor does (`round((x / 2 + 0.5) * 255)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = int(Image.Resampling.BICUBIC)  # the `resample` value in preprocessor_config.json


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
    """CLIPImageProcessor's knobs (preprocessor_config.json names, flattened)."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resize_to: tuple[int, int] | None = None  # (height, width): `size` given as both, exact
    resample: int = _BICUBIC  # a Pillow filter number, as preprocessor_config.json stores it


def settings_from_dict(cfg: Mapping, where: str = "preprocessor_config.json"
                       ) -> PreprocessSettings:
    """A CLIPImageProcessor config dict -> settings; unsupported choices raise naming the key."""
    resample = cfg.get("resample", _BICUBIC)
    if resample not in {int(f) for f in Image.Resampling}:
        raise ValueError(f"{where}: resample={resample!r} is not a Pillow filter; expected one "
                         f"of {sorted(int(f) for f in Image.Resampling)}")
    size = cfg.get("size", {"shortest_edge": 224})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if not isinstance(size, Mapping) or set(size) not in ({"shortest_edge"}, {"height", "width"}):
        raise ValueError(f"{where}: size={size!r} is not supported; expected "
                         "{'shortest_edge': N} or {'height': H, 'width': W}")
    crop = cfg.get("crop_size", {"height": 224, "width": 224})
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if not isinstance(crop, Mapping) or set(crop) != {"height", "width"}:
        raise ValueError(f"{where}: crop_size={crop!r}, expected {{'height': H, 'width': W}}")
    exact = "height" in size
    out = PreprocessSettings(
        shortest_edge=0 if exact else int(size["shortest_edge"]),
        resize_to=(int(size["height"]), int(size["width"])) if exact else None,
        resample=int(resample), crop_height=int(crop["height"]),
        crop_width=int(crop["width"]),
        image_mean=tuple(float(v) for v in cfg.get("image_mean", OPENAI_CLIP_MEAN)),
        image_std=tuple(float(v) for v in cfg.get("image_std", OPENAI_CLIP_STD)),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
        **{k: bool(cfg.get(k, True)) for k in ("do_resize", "do_center_crop", "do_rescale",
                                               "do_normalize")})
    if len(out.image_mean) != 3 or len(out.image_std) != 3 or min(out.image_std) <= 0:
        raise ValueError(f"{where}: image_mean {out.image_mean} / image_std {out.image_std} must "
                         "have 3 entries each, std > 0")
    return out


def to_uint8(pixels) -> np.ndarray:
    """vdit pixels in [-1, 1] (any float array) -> uint8 in [0, 255], diffusers' rounding."""
    x = np.clip(np.asarray(pixels, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(x * 255).astype(np.uint8)


def preprocess(images, settings: PreprocessSettings = PreprocessSettings()) -> np.ndarray:
    """uint8 images (see module doc) -> float32 `[B, crop_height, crop_width, 3]`."""
    batch = _as_image_list(images)
    return np.stack([_preprocess_one(img, settings, i) for i, img in enumerate(batch)])


def _as_image_list(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or not images:
        raise ValueError(f"images must be a uint8 array [H, W, 3] / [B, H, W, 3] or a non-empty "
                         f"list of [H, W, 3], got {type(images).__name__}")
    out = []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image {i}: expected uint8 [H, W, 3] (channels last, RGB), got "
                             f"shape {img.shape} dtype {img.dtype}; convert [-1, 1] floats with "
                             "image_preprocess.to_uint8")
        out.append(img)
    return out


def _preprocess_one(img: np.ndarray, s: PreprocessSettings, index: int) -> np.ndarray:
    if s.do_resize:
        img = resize_bicubic(img, s.resize_to or shortest_edge_size(img.shape[:2], s.shortest_edge),
                             s.resample)
    if s.do_center_crop:
        img = center_crop(img, s.crop_height, s.crop_width, index)
    x = img.astype(np.float64) * s.rescale_factor if s.do_rescale else img
    x = np.asarray(x, np.float32)
    if s.do_normalize:
        x = (x - np.asarray(s.image_mean, np.float32)) / np.asarray(s.image_std, np.float32)
    return x


def shortest_edge_size(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `size` (the longer one truncated)."""
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def center_crop(img: np.ndarray, height: int, width: int, index: int = 0) -> np.ndarray:
    h, w = img.shape[:2]
    if height > h or width > w:
        raise ValueError(f"image {index}: crop {height}x{width} is larger than the resized image "
                         f"{h}x{w}; use crop_size <= size")
    top, left = (h - height) // 2, (w - width) // 2
    return img[top:top + height, left:left + width]


def resize_bicubic(img: np.ndarray, size: tuple[int, int], resample: int = _BICUBIC) -> np.ndarray:
    """uint8 `[H, W, C]` -> uint8 `[h, w, C]` by Pillow's `Image.resize` (bicubic by default)."""
    h, w = size
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling(resample)))
