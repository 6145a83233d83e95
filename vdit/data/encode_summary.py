"""`vdit encode`'s bookkeeping beside the latent shards: which shards are finished, with what
counts, skipped files and normalisation stats, for resuming and for merging sharded runs.

Each shard's entry is keyed by its file name: {"records", "skipped": [...], "stats": stats_id,
"fingerprint": what it was encoded from (`encode_videos.shard_fingerprint`)}.
One worker (`--num-shards 1`) keeps them in encode_summary.json; worker i of n (n > 1) in its own
encode_summary-i-of-n.json (no two workers rewrite one file), and whichever worker finds every
shard finished merges them, by name, into encode_summary.json. Reading takes the union of all
these files, so a rerun with any worker count skips what any earlier worker finished. Merging
checks that every shard was normalised with the same stats as stats.json, so the shards of a
sharded run are consistent for training. A rerun whose inputs would put other clips in a
finished shard is refused (`check_fingerprints`) rather than skipping it as finished.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter

from vdit import runs

log = logging.getLogger(__name__)
SUMMARY_FILE = "encode_summary.json"
WORKER_FILE = "encode_summary-{shard:05d}-of-{num_shards:05d}.json"
SHARD_NAME = re.compile(r"latents-\d{5}-of-(\d{5})\.array_record")


def summary_file(shard: int, num_shards: int) -> str:
    """Name of worker `shard`'s summary (the merged name when it is the only worker)."""
    return SUMMARY_FILE if num_shards == 1 else WORKER_FILE.format(shard=shard,
                                                                   num_shards=num_shards)


def read_done(out_dir) -> dict:
    """{shard name: entry} over every summary file in `out_dir`: the merged one, then the
    workers' (their own record wins over a merged copy)."""
    done = {}
    paths = runs.user_path(out_dir).glob("encode_summary*.json")
    for path in sorted(paths, key=lambda p: (p.name != SUMMARY_FILE, p.name)):
        done.update(json.loads(path.read_text())["shards"])
    return done


def write(out_dir, name: str, shards: dict) -> None:
    """Atomically replaces `out_dir/name` with {"shards": shards}."""
    path = runs.user_path(out_dir) / name
    tmp = path.parent / f"{name}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"shards": shards}, indent=1))
    tmp.replace(path)


def check_layout(out_dir, count: int) -> None:
    """A latents folder holds one encode: shards of another count are an error naming them."""
    other = set()
    for path in runs.user_path(out_dir).glob("latents-*-of-*.array_record"):
        match = SHARD_NAME.fullmatch(path.name)
        if match and int(match.group(1)) != count:
            other.add(int(match.group(1)))
    if other:
        raise ValueError(
            f"latents folder {str(out_dir)!r} already holds an encode into {sorted(other)} shards, "
            f"not {count} (the shard count is max(encode.num_shards, --num-shards), at most one "
            "per video): resume it with the same settings or encode into a new folder")


def check_fingerprints(out_dir, done: dict, expected: dict) -> None:
    """Finished shards (in `done` and on disk) were encoded from what `expected` ({name:
    (fingerprint, number of entries)}) says they would hold now. Entries written before
    fingerprints were recorded are checked by their count alone (records + skipped)."""
    folder = runs.user_path(out_dir)
    odd = []
    for name, (fingerprint, size) in expected.items():
        entry = done.get(name)
        if entry is None or not (folder / name).exists():
            continue
        if ("fingerprint" in entry and entry["fingerprint"] != fingerprint) or (
                "fingerprint" not in entry and entry["records"] + len(entry["skipped"]) != size):
            odd.append(name)
    if odd:
        raise ValueError(
            f"latents folder {str(out_dir)!r} holds finished shards {sorted(odd)} encoded from "
            "other inputs: the source's clips (a grown or edited manifest or folder: keys, frame "
            "ranges, captions, crop boxes) or config keys encode.shapes, encode.shape_weights, "
            "encode.seed, encode.fps changed since, and a rerun would skip those shards as "
            "finished; encode into a new folder (or delete this one's latents-*.array_record "
            "and encode_summary*.json files to encode it again)")


def check_stats(names: list[str], shards: dict, stats: str, out_dir) -> None:
    """Every listed shard was normalised with stats `stats` (those of stats.json)."""
    odd = [n for n in names if shards.get(n, {}).get("stats", stats) != stats]
    if odd:
        raise ValueError(
            f"shards {odd} in {str(out_dir)!r} were normalised with other latent stats than "
            f"{runs.STATS_FILE} (workers that measured them at once?): delete those shard files "
            "and rerun their workers, which then normalise with the stats on disk")


def merge_if_complete(out_dir, names: list[str], stats: str) -> bool:
    """Writes encode_summary.json over all shards once every one of `names` is finished."""
    done = read_done(out_dir)
    if not all(n in done and (runs.user_path(out_dir) / n).exists() for n in names):
        return False
    check_stats(names, done, stats, out_dir)
    write(out_dir, SUMMARY_FILE, {n: done[n] for n in names})
    return True


def totals(paths: list[str], shards: dict, filtered: int = 0) -> dict:
    """Counts over the shards at `paths`: records, skipped (by reason, files), filtered."""
    names = [runs.user_path(p).name for p in paths]
    skipped = [s for n in names for s in shards[n]["skipped"]]
    by_reason = dict(Counter(s["reason"] for s in skipped))
    out = {"paths": paths, "records": sum(shards[n]["records"] for n in names),
           "skipped": len(skipped), "skipped_by_reason": by_reason,
           "skipped_files": [s["file"] for s in skipped], "filtered": filtered}
    log.info("encode: %d clips in %d shards; skipped %d videos %s; %d manifest lines not kept",
             out["records"], len(paths), out["skipped"], by_reason, filtered)
    return out
