"""The clip ledger: each worker's clips-{i:05d}-of-{n:05d}.jsonl, resuming, merging, the summary.

One line per detected clip (see `pipeline.py` for the fields), plus one line per video that could
not be curated (`reason` "unreadable" or "failed", with `error`). Lines are appended only after
the part file holding their kept clips is finished, so the ledger never points at frames that
are not on disk. A ledger starts with a header line ({"vdit_ledger": 2}); each append is one
batch whose last line carries `"batch_end": true`; lines after the last batch end (a crash
mid-append, possibly tearing a line) are not part of the ledger, and a rerun rewrites the file
without them before appending. (A ledger without the header, from before batches, counts every
whole line.) Readers get the lines without the header and the batch marks. A rerun skips every video
whose last segment is in the ledger and every finished segment of the others; part files no
ledger line points at (a crash between writing a part and its lines) are deleted.
When every worker has finished (a clips-i-of-n.done marker each), the ledgers are merged into
clips.jsonl.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re

from vdit import runs

log = logging.getLogger(__name__)
LEDGER_PATTERN = "clips-{shard:05d}-of-{num_shards:05d}.jsonl"
DONE_PATTERN = "clips-{shard:05d}-of-{num_shards:05d}.done"
MERGED = "clips.jsonl"
NOT_CURATED = ("unreadable", "failed")  # reasons of videos that yielded no clips at all
HEADER_KEY = "vdit_ledger"  # the first line of a ledger written in batches


def ledger_path(output: str, shard: int, num_shards: int) -> str:
    return str(runs.user_path(output) / LEDGER_PATTERN.format(shard=shard, num_shards=num_shards))


def done_path(output: str, shard: int, num_shards: int) -> str:
    return str(runs.user_path(output) / DONE_PATTERN.format(shard=shard, num_shards=num_shards))


def check_num_shards(output: str, num_shards: int) -> None:
    """An output folder holds one run layout: ledgers of another --num-shards are an error."""
    other = set()
    for path in runs.user_path(output).glob("clips-*-of-*.jsonl"):
        match = re.fullmatch(r"clips-\d{5}-of-(\d{5})\.jsonl", path.name)
        if match and int(match.group(1)) != num_shards:
            other.add(int(match.group(1)))
    if other:
        raise ValueError(f"output folder {output!r} already holds a curate run with "
                         f"--num-shards {sorted(other)}, not {num_shards}; resume it with the "
                         "same --num-shards or write to a new folder")


def read_ledger(path: str) -> list[dict]:
    """The committed lines of a ledger ([] if it does not exist): those up to the last
    `batch_end`. The rest (a crash mid-append) is left out with a warning; a line that is not
    JSON before that is an error naming the line."""
    return _read(path)[0]


def repair(path: str) -> list[dict]:
    """read_ledger, and the file rewritten without an interrupted append's lines (so the next
    append starts on a line of its own)."""
    lines, interrupted = _read(path)
    if interrupted:
        _rewrite(path, lines)
    return lines


def _read(path: str) -> tuple[list[dict], bool]:
    """(committed lines without header or batch marks, whether anything after them was left
    out)."""
    if not runs.user_path(path).exists():
        return [], False
    raw = runs.user_path(path).read_text().split("\n")
    parsed, torn = [], False
    for number, text in enumerate(raw, 1):
        if not text.strip():
            continue
        try:
            parsed.append(json.loads(text))
        except json.JSONDecodeError as e:
            if number >= len(raw) - 1:  # torn by a crash: its batch never ended
                torn = True
                break
            raise ValueError(f"ledger {path} line {number} is not JSON: {e}") from e
    batched = bool(parsed) and isinstance(parsed[0], dict) and HEADER_KEY in parsed[0]
    committed = len(parsed)
    if batched:
        committed = max([i + 1 for i, ln in enumerate(parsed) if ln.get("batch_end")], default=0)
    interrupted = torn or committed < len(parsed) or raw[-1] != ""
    if interrupted:
        log.warning("curate: leaving out the last %d line(s) of %s: an append a crash "
                    "interrupted (their videos are curated again)",
                    len(parsed) + torn - committed, path)
    lines = parsed[1 if batched else 0:committed]
    return [{k: v for k, v in ln.items() if k != "batch_end"} for ln in lines], interrupted


def _batch(lines: list[dict], header: bool) -> str:
    """Ledger text of one append: [the header,] the lines, the last marked `batch_end`."""
    marked = [*lines[:-1], {**lines[-1], "batch_end": True}] if lines else []
    head = [{HEADER_KEY: 2, "batch_end": True}] if header else []
    return "".join(json.dumps(line) + "\n" for line in head + marked)


def _rewrite(path: str, lines: list[dict]) -> None:
    """The ledger replaced by `lines`, atomically (a crash leaves the old file or the new)."""
    target = runs.user_path(path)
    tmp = target.parent / f"{target.name}.tmp{os.getpid()}"
    tmp.write_text(_batch(lines, header=True))
    tmp.replace(target)


def append_lines(path: str, lines: list[dict]) -> None:
    """Appends lines as one batch, durably (flush + fsync), so a rerun sees them after a crash.
    An object store (gs://) has no append: the ledger object is rewritten whole, which is atomic
    there."""
    if not lines:
        return
    target = runs.user_path(path)
    if runs.is_remote(path):
        old = target.read_text() if target.exists() else ""
        target.write_text(old + _batch(lines, header=not old))
        return
    text = _batch(lines, header=not target.exists() or target.stat().length == 0)
    with open(path, "a") as f:  # a local path (is_remote is False): fsync needs a real file
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def finished(lines: list[dict]) -> tuple[set[str], set[tuple[str, int]]]:
    """(sources whose last segment is recorded, (source, segment) pairs recorded)."""
    videos = {ln["source"] for ln in lines if ln.get("last_segment")}
    segments = {(ln["source"], int(ln.get("segment", 0))) for ln in lines}
    return videos, segments


def referenced_files(lines: list[dict]) -> set[str]:
    return {ln["shard_file"] for ln in lines if ln.get("shard_file")}


def merge_if_complete(output: str, num_shards: int) -> str | None:
    """Writes clips.jsonl (all workers' lines, in worker order) once every worker is done;
    returns its path, or None while some worker is still missing."""
    if not all(runs.user_path(done_path(output, i, num_shards)).exists()
               for i in range(num_shards)):
        return None
    merged = runs.user_path(output) / MERGED
    tmp = runs.user_path(output) / f"{MERGED}.tmp{os.getpid()}"
    with tmp.open("w") as out:
        for i in range(num_shards):
            out.writelines(json.dumps(line) + "\n"
                           for line in read_ledger(ledger_path(output, i, num_shards)))
    tmp.replace(merged)
    return str(merged)


def summarize(lines: list[dict]) -> dict:
    """Counts over ledger lines: videos, unreadable, clips, kept, hours kept, drops by reason."""
    clips = [ln for ln in lines if ln.get("reason") not in NOT_CURATED]
    kept = [ln for ln in clips if ln.get("kept")]
    return {
        "videos": len({ln["source"] for ln in lines}),
        "unreadable": sorted({ln["source"] for ln in lines if ln.get("reason") == "unreadable"}),
        "failed": sorted({ln["source"] for ln in lines if ln.get("reason") == "failed"}),
        "clips": len(clips),
        "kept": len(kept),
        "kept_hours": sum(ln["seconds"] for ln in kept) / 3600.0,
        "dropped": dict(collections.Counter(ln["reason"] for ln in clips if not ln.get("kept"))
                        .most_common()),
    }


def format_summary(summary: dict, header: str = "") -> str:
    """A plain-text table of `summarize` output."""
    rows = [("videos", str(summary["videos"])),
            ("unreadable videos", str(len(summary["unreadable"]))),
            ("failed videos", str(len(summary["failed"]))),
            ("clips detected", str(summary["clips"])),
            ("clips kept", f"{summary['kept']} ({summary['kept_hours'] * 60:.2f} min)")]
    rows += [(f"dropped: {reason}", str(count)) for reason, count in summary["dropped"].items()]
    width = max(len(name) for name, _ in rows)
    text = [header] if header else []
    text += [f"  {name:<{width}}  {value:>12}" for name, value in rows]
    text += [f"  unreadable: {src}" for src in summary["unreadable"]]
    text += [f"  failed: {src}" for src in summary["failed"]]
    return "\n".join(text)
