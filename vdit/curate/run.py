"""`vdit curate`: a folder of videos or a jsonl manifest -> clip shards + clips.jsonl.

Input: a folder (videos found recursively by `curate.input.extensions`; source = path relative
to the folder) or a .jsonl manifest of {"path": ..., "caption": ...?} (relative paths resolve
against the manifest's folder; source = the path as written).
Sharding: `--shard i --num-shards n` takes the videos whose sha1(source) % n == i, so workers
split any input the same way without talking to each other, and a video added later lands on a
fixed worker. Worker i writes clips-i-of-n-part-*.array_record (see `records.py`) and its ledger
clips-i-of-n.jsonl (see `ledger.py`); reruns resume from the ledger. An unreadable video is
recorded, counted and skipped, never fatal. A summary table ends the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from tqdm import tqdm

from vdit import runs
from vdit.config import load_config
from vdit.curate import captions, ledger, records
from vdit.curate.decode import iter_segments
from vdit.curate.learned import build_learned_scorers
from vdit.curate.pipeline import ClipResult, VideoItem, process_segment
from vdit.curate.settings import check_curate_config, default_config_path
from vdit.data.video_files import caption_of
from vdit.data.video_io import VideoReadError, find_videos, manifest_lines
from vdit.train.lock import FolderLock, NoLock

log = logging.getLogger(__name__)


def list_inputs(input_path: str, extensions) -> list[VideoItem]:
    """Videos of a folder (sorted) or a jsonl manifest (in file order)."""
    path = Path(input_path)
    if path.is_dir():  # a link to a missing file is listed: curate counts it unreadable
        return [VideoItem(p.relative_to(path).as_posix(), str(p))
                for p in find_videos(path, extensions)]
    if path.is_file() and path.suffix == ".jsonl":
        return _read_manifest(path)
    raise FileNotFoundError(f"--input {input_path!r}: expected a folder of videos or a .jsonl "
                            "manifest ({\"path\": ..., \"caption\": ...} per line)")


def _read_manifest(path: Path) -> list[VideoItem]:
    items, seen = [], set()
    for number, entry, text in manifest_lines(path):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"manifest {path} line {number}: expected an object with a "
                             f"\"path\" string, got {text[:80]!r}")
        source = entry["path"]
        if source in seen:
            raise ValueError(f"manifest {path} line {number}: {source!r} is listed twice")
        seen.add(source)
        file = Path(source) if Path(source).is_absolute() else path.parent / source
        caption = None if entry.get("caption") is None else caption_of(
            entry, f"manifest {path} line {number}")
        items.append(VideoItem(source, str(file), caption))
    return items


def shard_of(source: str, num_shards: int) -> int:
    # os.walk hands over a name that is not UTF-8 as surrogates: back to its bytes, not an error
    name = source.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha1(name).digest()[:8], "big") % num_shards


class OutputWriteError(OSError):
    """A part file or ledger line could not be written (a full or read-only output): the run
    stops, as every later video would fail the same way; no video is blamed or recorded, and a
    rerun redoes what the ledger does not hold."""


class PartWriter:
    """Buffers kept clips and their ledger lines; flushes a part file, then the lines."""

    def __init__(self, output: str, shard: int, num_shards: int, cfg, next_part: int):
        self.output, self.shard, self.num_shards, self.cfg = output, shard, num_shards, cfg
        self.part = next_part
        self.clips, self.lines, self.bytes = [], [], 0

    def add(self, results) -> None:
        for result in results:
            if result.frames is not None:
                self.clips.append({"frames": result.frames, "caption": result.line["caption"],
                                   "recaption": result.line["recaption"],
                                   "fps": result.line["fps"], "meta": result.line})
                self.bytes += result.frames.nbytes
            self.lines.append(result.line)
        if (len(self.clips) >= self.cfg.clips_per_file
                or self.bytes >= self.cfg.max_file_mb * 2**20):
            self.flush()

    def flush(self) -> None:
        if self.clips:
            path = records.part_path(self.output, self.shard, self.num_shards, self.part)
            name = os.path.basename(path)
            for index, clip in enumerate(self.clips):
                clip["meta"].update(shard_file=name, shard_index=index)
            _write(path, records.write_clip_file, self.clips)
            self.part += 1
        _write(ledger.ledger_path(self.output, self.shard, self.num_shards), ledger.append_lines,
               self.lines)
        self.clips, self.lines, self.bytes = [], [], 0


def _write(path: str, write, items) -> None:
    """`write(path, items)`; an OSError becomes OutputWriteError naming `path`."""
    try:
        write(path, items)
    except OSError as e:
        raise OutputWriteError(f"curate: cannot write {path} ({e}); is the output full or "
                               "read-only? Rerun when it is writable: the run resumes") from e


def _resume(output: str, shard: int, num_shards: int) -> tuple[list[dict], int]:
    """(ledger lines so far, next part index); deletes orphan part files."""
    lines = ledger.repair(ledger.ledger_path(output, shard, num_shards))
    used = ledger.referenced_files(lines)
    next_part = 0
    for path in records.worker_parts(output, shard, num_shards):
        name = os.path.basename(path)
        if name in used:
            next_part = max(next_part, int(name.rsplit("-", 1)[1].split(".")[0]) + 1)
        else:
            log.warning("curate: deleting %s (no ledger line points at it: an interrupted run)",
                        path)
            runs.user_path(path).unlink()
    return lines, next_part


def _sidecar(item: VideoItem, cfg):
    if not cfg.captions.sidecar:
        return None
    try:
        return captions.read_sidecar(item.path)
    except (ValueError, OSError) as e:  # unreadable or malformed: the video is still curated
        log.warning("curate: %s; %s gets no sidecar caption", e, item.source)
        return None


def _process_video(item: VideoItem, done_segments, writer: PartWriter, cfg, scorers,
                   captioner) -> str:
    """Curates one video into the writer. Returns "" or, when it could not be curated (and
    was recorded as such, so reruns skip it), "unreadable" or "failed"."""
    sidecar = _sidecar(item, cfg)
    segment_index = 0
    try:
        for segment in iter_segments(item.path, cfg.decode):
            segment_index = segment.index  # the one a failure is recorded under
            if (item.source, segment.index) not in done_segments:
                writer.add(process_segment(segment, item, sidecar, cfg, scorers, captioner))
            segment_index = segment.index + 1
    except OutputWriteError:
        raise  # the output, not this video: nothing to record (see OutputWriteError)
    except VideoReadError as e:
        log.warning("curate: skipping unreadable video: %s", e)
        writer.add([_not_curated(item, segment_index, "unreadable", str(e))])
        return "unreadable"
    except Exception as e:  # noqa: BLE001 - one odd video must not stop a long run; counted
        log.exception("curate: curating %s failed; recorded as 'failed' and skipped", item.path)
        writer.add([_not_curated(item, segment_index, "failed", f"{type(e).__name__}: {e}")])
        return "failed"
    return ""


def _not_curated(item: VideoItem, segment: int, reason: str, error: str) -> ClipResult:
    return ClipResult({"source": item.source, "segment": segment, "last_segment": True,
                       "start_frame": 0, "end_frame": 0, "seconds": 0.0, "kept": False,
                       "reason": reason, "reasons": [reason], "error": error}, None)


def curate(config, input_path: str, output: str, shard: int = 0, num_shards: int = 1,
           scorers=None, captioner=None) -> dict:
    """Curates this worker's share of the input; returns the summary (see ledger.summarize)
    over its whole ledger plus `this_run` counts. `scorers`/`captioner` override the ones the
    config names (None = build from the config)."""
    cfg = config.curate
    check_curate_config(cfg)
    if num_shards < 1:
        raise ValueError(f"--num-shards {num_shards}: expected a count >= 1")
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard {shard} is outside [0, --num-shards {num_shards})")
    items = list_inputs(input_path, cfg.input.extensions)
    if not items:  # a mistyped folder would otherwise "succeed" with nothing done
        raise FileNotFoundError(f"--input {input_path!r} holds no videos (looked for suffixes "
                                f"{list(cfg.input.extensions)}, config key "
                                "'curate.input.extensions')")
    items = [it for it in items if shard_of(it.source, num_shards) == shard]
    if runs.user_path(output).exists() and not runs.user_path(output).is_dir():
        raise ValueError(f"--output {output!r} is a file, not a folder")
    runs.user_path(output).mkdir(parents=True, exist_ok=True)  # gs:// too
    # one writer per shard: two workers on one shard would record videos as both kept and failed
    lock = str(runs.user_path(output) / f".lock-{shard:05d}-of-{num_shards:05d}")
    with (NoLock() if runs.is_remote(output) else  # an object store: see workdir_lock
          FolderLock(lock, f"curate shard {shard}/{num_shards} of {output}")):
        return _curate_shard(cfg, items, output, shard, num_shards, scorers, captioner)


def _curate_shard(cfg, items, output: str, shard: int, num_shards: int, scorers,
                  captioner) -> dict:
    ledger.check_num_shards(output, num_shards)
    lines, next_part = _resume(output, shard, num_shards)
    done_videos, done_segments = ledger.finished(lines)
    todo = [it for it in items if it.source not in done_videos]
    scorers = build_learned_scorers(cfg.scores) if scorers is None else list(scorers)
    captioner = captions.load_captioner(cfg.captions) if captioner is None else captioner
    writer = PartWriter(output, shard, num_shards, cfg.output, next_part)
    failures = {"unreadable": 0, "failed": 0}
    for item in tqdm(todo, desc=f"curate {shard}/{num_shards}", unit="video",
                     disable=not cfg.output.progress):
        failure = _process_video(item, done_segments, writer, cfg, scorers, captioner)
        if failure:
            failures[failure] += 1
    writer.flush()
    runs.user_path(ledger.done_path(output, shard, num_shards)).touch()
    ledger.merge_if_complete(output, num_shards)
    summary = ledger.summarize(ledger.read_ledger(ledger.ledger_path(output, shard, num_shards)))
    summary["this_run"] = {"videos": len(todo), "skipped_done": len(items) - len(todo),
                           **failures}
    return summary


def run_cli(args) -> int:
    """Entry point of `vdit curate`; args has config, overrides, input, output, shard,
    num_shards. Returns the exit code."""
    config = load_config(args.config or default_config_path(), list(args.overrides or ()))
    summary = curate(config, args.input, args.output, args.shard, args.num_shards)
    run = summary["this_run"]
    header = (f"vdit curate: worker {args.shard}/{args.num_shards}: {run['videos']} videos "
              f"processed ({run['unreadable']} unreadable, {run['failed']} failed), "
              f"{run['skipped_done']} already done; "
              f"output {runs.absolute(args.output)}")
    print(ledger.format_summary(summary, header))
    return 0
