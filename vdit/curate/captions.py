"""Clip captions: originals from the manifest or a sidecar file, and optional model recaptions.

Original captions, in order of precedence:
  1. the manifest line's "caption" (jsonl input);
  2. a sidecar VIDEO.json next to the video: {"caption": "..."} for the whole video, or
     {"captions": [{"start": s, "end": e, "caption": "..."}, ...]} with times in seconds (a
     clip gets the entry that overlaps it most);
  3. a sidecar VIDEO.txt (its stripped text).
A captioning model, when configured, writes `recaption`; the original stays in `caption`, so both
reach the clip shards. A captioner is any callable fn(frames uint8 [T, H, W, 3], caption: str)
-> str; the config names a factory "module:function" that builds one from `captioner_arg`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vdit.data.video_io import read_text

log = logging.getLogger(__name__)
Captioner = Callable[[np.ndarray, str], str]


def read_sidecar(video_path: str | Path) -> dict | None:
    """The sidecar of a video as {"caption": str} or {"captions": [...]}; None if it has none.
    A malformed sidecar is an error naming the file."""
    video_path = Path(video_path)
    json_path, txt_path = video_path.with_suffix(".json"), video_path.with_suffix(".txt")
    if json_path.is_file():
        try:
            data = json.loads(read_text(json_path))
        except json.JSONDecodeError as e:
            raise ValueError(f"caption sidecar {json_path} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or not ({"caption", "captions"} & data.keys()):
            raise ValueError(f"caption sidecar {json_path} must be an object with \"caption\" "
                             "or \"captions\" ([{start, end, caption}] in seconds)")
        if "captions" in data:  # checked whole here, so a bad entry costs the captions only
            data["captions"] = _checked_entries(data["captions"], json_path)
        return data
    if txt_path.is_file():
        return {"caption": read_text(txt_path).strip()}
    return None


def _checked_entries(entries, where) -> list[dict]:
    """[{start, end, caption}] with float times and text captions; a bad entry is named."""
    checked = []
    for i, entry in enumerate(entries if isinstance(entries, list) else [entries]):
        try:
            checked.append({**entry, "start": float(entry["start"]), "end": float(entry["end"]),
                            "caption": str(entry["caption"])})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"caption sidecar {where}: captions[{i}] = {entry!r:.200}; expected "
                             "{\"start\": seconds, \"end\": seconds, \"caption\": text}") from e
    return checked


def _best_overlap(entries: list, start_s: float, end_s: float, where: str) -> str:
    best, best_overlap = "", 0.0
    for entry in _checked_entries(entries, where):
        overlap = min(end_s, entry["end"]) - max(start_s, entry["start"])
        if overlap > best_overlap:
            best, best_overlap = entry["caption"], overlap
    return best


def original_caption(manifest_caption: str | None, sidecar: dict | None, start_s: float,
                     end_s: float, where: str = "") -> tuple[str, str]:
    """(caption, where it came from: "manifest", "sidecar" or "") of a clip [start_s, end_s)."""
    if manifest_caption:
        return str(manifest_caption), "manifest"
    if sidecar:
        if "captions" in sidecar:
            caption = _best_overlap(list(sidecar["captions"]), start_s, end_s, where)
        else:
            caption = str(sidecar.get("caption") or "")
        if caption:
            return caption, "sidecar"
    return "", ""


def load_captioner(cfg) -> Captioner | None:
    """The captioning model named by `config.curate.captions.captioner` ("module:function",
    called with `captioner_arg`), or None (logged) when none is configured."""
    spec = cfg.captioner
    if not spec:
        log.info("curate: no captions.captioner configured; clips keep their original captions "
                 "(recaption is left empty)")
        return None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"config key 'curate.captions.captioner' = {spec!r}; expected "
                         "'module:function' (a factory returning fn(frames, caption) -> str)")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config key 'curate.captions.captioner' = {spec!r} cannot be "
                         f"loaded: {e}") from e
    captioner = factory(cfg.captioner_arg)
    if not callable(captioner):
        raise ValueError(f"captioner factory {spec!r} returned {type(captioner).__name__}, "
                         "expected a callable fn(frames, caption) -> str")
    return captioner


def recaption(captioner: Captioner | None, frames: np.ndarray, caption: str) -> str:
    if captioner is None:
        return ""
    text = captioner(frames, caption)
    if not isinstance(text, str):
        raise TypeError(f"captioner returned {type(text).__name__}, expected str")
    return text.strip()
