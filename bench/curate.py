"""Shot-boundary benchmark: `vdit curate`'s cut detection on the transition suite
(vdit/curate/suite.py) with the defaults of configs/curate.py.

Prints one JSON line per transition kind (cut, dissolve, fade, fade_out, fade_in, wipe):
recall (a boundary within 1 frame of a cut, within half its length of a gradual transition's
middle), precision (false boundaries are any others in the same videos) and spanning_clips
(clips holding a transition's frames, which must be 0); one per hard-negative kind (fast_pan,
shake, flash, crossing, slow_zoom, lighting): the share of videos with any boundary; and a last
line with detection speed (videos/s and frames/s, generation excluded) on this machine. The full
suite has 32 videos per transition kind and 20 per hard negative; `--seed` draws another one
(report more than one: the defaults must not be fitted to one draw). `--kinds wipe,crossing`
measures only those kinds (the same videos as in the full suite; the others are still drawn,
not measured). Videos are made and measured one at a time.

    .venv/bin/python bench/curate.py [--quick] [--seed 0] [--kinds wipe,crossing] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import time

from vdit.config import load_config
from vdit.curate import cuts, suite_score
from vdit.curate.settings import default_config_path
from vdit.curate.suite import NEGATIVE_KINDS, TRANSITION_KINDS, iter_suite


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="one or two small videos per kind (seconds), as the tests run it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="",
                   help="comma-separated transition / hard-negative kinds (default: all)")
    p.add_argument("--verbose", action="store_true", help="also a line per missed/false video")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cfg = load_config(default_config_path()).curate.cuts
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(TRANSITION_KINDS) - set(NEGATIVE_KINDS)
    if unknown:
        raise SystemExit(f"--kinds: unknown {sorted(unknown)}; expected some of "
                         f"{TRANSITION_KINDS + NEGATIVE_KINDS}")
    rows, seconds, frames, count = [], 0.0, 0, 0
    for video in iter_suite(seed=args.seed, quick=args.quick, kinds=kinds):
        count += 1
        start = time.perf_counter()
        found = cuts.detect_boundaries(video.frames, video.fps, cfg)
        seconds += time.perf_counter() - start
        frames += len(video.frames)
        clips = cuts.split_clips(len(video.frames), found, video.fps)
        hits, false = suite_score.match(video, found)
        rows.append({"kind": video.kind, "transitions": len(video.transitions), "hits": hits,
                     "false": false, "spanning": suite_score.spanning(video, clips),
                     "negative": not video.transitions})
        if args.verbose and (hits < len(video.transitions) or false or rows[-1]["spanning"]):
            print(json.dumps({"video": video.name, "truth": [vars(t) for t in video.transitions],
                              "found": [vars(b) for b in found], "clips": clips}))
    out = [{"kind": kind, **figures}
           for kind, figures in suite_score.summarize(rows).items()]
    out.append({"speed": True, "videos": count, "frames": frames,
                "videos_per_s": count / seconds, "frames_per_s": frames / seconds,
                "quick": args.quick, "seed": args.seed})
    for line in out:
        print(json.dumps(line))
    return out


if __name__ == "__main__":
    main()
