"""Scoring shot boundaries against a transition suite's truth (see `suite.py`).

A true transition is found when a boundary lies within its tolerance of the transition's middle:
1 frame for a hard cut, half its length (at least 1 frame) for a gradual one. Every other
boundary is a false one. A clip "spans" a transition when it holds frames of both shots around
a cut, or any of a gradual transition's frames.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from vdit.curate.cuts import Boundary
from vdit.curate.suite import SuiteVideo, Transition


def tolerance(t: Transition) -> float:
    return max(1.0, (t.end - t.start) / 2)


def match(video: SuiteVideo, found: list[Boundary]) -> tuple[int, int]:
    """(true transitions found, false boundaries) of one video; each boundary matches at most
    one transition, nearest first."""
    free = list(found)
    hits = 0
    for t in video.transitions:
        near = [b for b in free if abs(b.frame - t.middle) <= tolerance(t)]
        if near:
            free.remove(min(near, key=lambda b: abs(b.frame - t.middle)))
            hits += 1
    return hits, len(free)


def spanning(video: SuiteVideo, clips: list[tuple[int, int]]) -> int:
    """Clips [start, end) holding a cut's both sides or any frame of a gradual transition."""
    count = 0
    for start, end in clips:
        for t in video.transitions:
            if t.end > t.start and start < t.end and t.start < end:
                count += 1
            elif t.end == t.start and start < t.start < end:
                count += 1
    return count


def summarize(rows: list[dict]) -> dict:
    """Per-kind figures from rows {kind, transitions, hits, false, spanning, negative}."""
    by_kind = defaultdict(list)
    for row in rows:
        by_kind[row["kind"]].append(row)
    out = {}
    for kind, group in by_kind.items():
        hits = sum(r["hits"] for r in group)
        false = sum(r["false"] for r in group)
        if group[0]["negative"]:
            out[kind] = {"videos": len(group),
                         "false_boundary_videos": sum(r["false"] > 0 for r in group),
                         "false_boundary_rate": float(np.mean([r["false"] > 0 for r in group]))}
            continue
        truth = sum(r["transitions"] for r in group)
        out[kind] = {"videos": len(group), "recall": hits / max(1, truth),
                     "precision": hits / max(1, hits + false),
                     "spanning_clips": sum(r["spanning"] for r in group)}
    return out
