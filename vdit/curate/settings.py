"""Where the default curate config lives, and start-up checks of `config.curate` that name the
offending key, its value and what is allowed (the lead's `vdit.config.validate` does not know
this section)."""

from __future__ import annotations

import math
from pathlib import Path

from vdit.config import ConfigError

SECTIONS = ("input", "decode", "cuts", "motion", "scores", "captions", "output")
POSITIVE = ("decode.max_segment_seconds", "decode.default_fps", "cuts.content_threshold",
            "cuts.gradual.thumb_size", "cuts.gradual.min_window", "cuts.gradual.contrast_floor",
            "cuts.gradual.min_change", "cuts.gradual.ratio", "cuts.gradual.cut_ratio",
            "cuts.gradual.return_change", "cuts.gradual.return_ratio",
            "cuts.gradual.return_views", "cuts.gradual.return_pairs",
            "cuts.gradual.view_size", "cuts.gradual.aligned_change",
            "cuts.gradual.aligned_samples", "cuts.gradual.alpha_points", "motion.fps", "motion.pair_fps",
            "motion.short_side", "motion.levels", "motion.winsize", "motion.iterations",
            "motion.poly_n", "motion.poly_sigma", "scores.frames", "scores.text_edge",
            "scores.text_min_aspect", "output.clips_per_file", "output.max_file_mb")
NON_NEGATIVE = ("decode.short_side", "decode.max_segment_mb", "cuts.short_side",
                "cuts.fade_threshold", "cuts.fade_rise", "cuts.fade_ramp_seconds",
                "cuts.min_scene_seconds", "cuts.merge_seconds", "cuts.min_clip_seconds",
                "cuts.gradual.return_seconds", "cuts.gradual.span_pad",
                "cuts.gradual.same_distance", "cuts.gradual.motion_spread",
                "cuts.max_clip_seconds", "motion.min_motion", "scores.short_side",
                "scores.min_sharpness", "scores.border_luma", "output.short_side")
FRACTIONS = ("cuts.fade_ramp_drop", "motion.pyr_scale", "scores.min_brightness", "scores.max_brightness",
             "scores.min_contrast", "scores.text_band", "scores.text_min_char_height",
             "scores.text_max_char_height", "scores.text_min_fill", "scores.max_text",
             "scores.max_border", "cuts.gradual.blend_change", "cuts.gradual.blend_fit",
             "cuts.gradual.blend_gain")


def default_config_path() -> str:
    """configs/curate.py of this checkout (the repository root holds both vdit/ and configs/)."""
    path = Path(__file__).resolve().parents[2] / "configs" / "curate.py"
    if not path.is_file():
        raise FileNotFoundError(f"default curate config {path} not found; pass --config "
                                "pointing at a file like configs/curate.py")
    return str(path)


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _number(cfg, key: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"config key 'curate.{key}' = {value!r}; expected a number")
    return value


def check_curate_config(cfg) -> None:
    """Raises ConfigError on the first impossible value of `config.curate`."""
    missing = [s for s in SECTIONS if s not in cfg]
    if missing:
        raise ConfigError(f"config section 'curate' lacks {missing}; start from configs/curate.py")
    for key in POSITIVE:
        if _number(cfg, key) <= 0:
            raise ConfigError(f"config key 'curate.{key}' = {_get(cfg, key)!r}; must be > 0")
    for key in NON_NEGATIVE:
        if _number(cfg, key) < 0:
            raise ConfigError(f"config key 'curate.{key}' = {_get(cfg, key)!r}; must be >= 0")
    for key in FRACTIONS:
        if not 0 <= _number(cfg, key) <= 1:
            raise ConfigError(f"config key 'curate.{key}' = {_get(cfg, key)!r}; must be in [0, 1]")
    scales = cfg.cuts.gradual.scales_seconds
    if not isinstance(scales, (list, tuple)) or not scales or not all(
            isinstance(v, (int, float)) and v > 0 for v in scales):
        raise ConfigError(f"config key 'curate.cuts.gradual.scales_seconds' = {scales!r}; "
                          "expected a non-empty tuple of durations > 0, e.g. (0.04, 0.2, 0.75)")
    zooms = cfg.cuts.gradual.zooms
    if not isinstance(zooms, (list, tuple)) or not zooms or not all(
            isinstance(v, (int, float)) and v > 0 for v in zooms):
        raise ConfigError(f"config key 'curate.cuts.gradual.zooms' = {zooms!r}; expected a "
                          "non-empty tuple of zoom factors > 0, e.g. (1.0, 1.15, 1 / 1.15)")
    pairs = [("motion.min_motion", "motion.max_motion"),
             ("scores.min_brightness", "scores.max_brightness"),
             ("scores.text_min_char_height", "scores.text_max_char_height")]
    for lo, hi in pairs:
        if _number(cfg, lo) > _number(cfg, hi):
            raise ConfigError(f"config keys 'curate.{lo}' = {_get(cfg, lo)!r} and "
                              f"'curate.{hi}' = {_get(cfg, hi)!r}: the minimum exceeds the maximum")
    if cfg.motion.poly_n not in (5, 7):
        raise ConfigError(f"config key 'curate.motion.poly_n' = {cfg.motion.poly_n!r}; "
                          "Farneback supports 5 or 7")
    if not cfg.input.extensions:
        raise ConfigError("config key 'curate.input.extensions' is empty; expected suffixes "
                          "such as ('.mp4', '.mov')")
