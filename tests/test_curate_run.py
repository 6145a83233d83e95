"""`vdit curate` end to end: folders and manifests of mp4s (one corrupt), clips.jsonl, clip shards
read back with Grain, sharded workers, resuming, long videos in segments, learned scorers and
captioners plugged in."""

import argparse
import json
import os

import curate_testing as ct
import grain
import numpy as np
import pytest

from vdit.config import load_config
from vdit.curate import ledger, records
from vdit.curate.decode import iter_segments
from vdit.curate.run import curate, list_inputs, run_cli, shard_of
from vdit.curate.settings import default_config_path
from vdit.data.video_io import write_mp4

FPS = 12.0
QUIET = ["--config.curate.output.progress=False"]
LINE_KEYS = {"source", "start_frame", "end_frame", "fps", "motion", "motion_peak", "kept",
             "reason", "reasons", "sharpness", "brightness", "contrast", "text", "border", "box",
             "caption", "recaption", "segment", "last_segment", "seconds"}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder of 4 mp4s (3 shots each, 2 s per shot, hard cuts at frames 24 and 48), a
    corrupt mp4, and a caption sidecar for v0."""
    folder = tmp_path_factory.mktemp("videos")
    shots = ct.scenes(12, 24, FPS)
    for v in range(4):
        write_mp4(folder / f"v{v}.mp4", np.concatenate(shots[3 * v:3 * v + 3]), FPS)
    (folder / "v0.txt").write_text("three scenes of shapes\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really" * 50)
    (folder / "notes.md").write_text("not a video")
    return folder


def _args(inp, out, shard=0, num_shards=1, overrides=()):
    return argparse.Namespace(config=None, overrides=[*QUIET, *overrides], input=str(inp),
                              output=str(out), shard=shard, num_shards=num_shards)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_folder_run_clips_shards_and_resume(videos, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(_args(videos, out)) == 0
    printed = capsys.readouterr().out
    assert "5 videos processed (1 unreadable, 0 failed)" in printed
    assert "unreadable: sub/broken.mp4" in printed
    lines = _lines(out / "clips.jsonl")
    by_source = {}
    for line in lines:
        by_source.setdefault(line["source"], []).append(line)
    assert sorted(by_source) == ["sub/broken.mp4", "v0.mp4", "v1.mp4", "v2.mp4", "v3.mp4"]
    assert by_source["sub/broken.mp4"][0]["reason"] == "unreadable"
    for v in range(4):
        clips = by_source[f"v{v}.mp4"]
        assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 24), (24, 48),
                                                                         (48, 72)]
        for clip in clips:
            assert LINE_KEYS <= clip.keys() and clip["fps"] == FPS
            assert clip["kept"] == (clip["reason"] == "") and clip["reasons"][:1] == (
                [clip["reason"]] if clip["reason"] else [])
    assert {c["caption"] for c in by_source["v0.mp4"]} == {"three scenes of shapes"}
    kept = [ln for ln in lines if ln["kept"]]
    summary = ledger.summarize(lines)
    print("folder run:", summary)
    assert summary["clips"] == 12 and summary["kept"] == len(kept) >= 8
    # Kept clips are in the shards, where their ledger lines say, with their frames.
    source = records.ClipShardSource(str(out))
    assert len(source) == len(kept)
    for line in kept:
        path = out / line["shard_file"]
        record = records.decode_clip(grain.sources.ArrayRecordDataSource([str(path)])[
            line["shard_index"]])
        assert record["frames"].shape == (line["end_frame"] - line["start_frame"], 64, 96, 3)
        assert record["meta"]["source"] == line["source"] and record["caption"] == line["caption"]
    # A rerun finds everything done and changes nothing.
    before = (out / "clips-00000-of-00001.jsonl").read_text()
    summary = curate(load_config(default_config_path(), QUIET), str(videos), str(out))
    assert summary["this_run"] == {"videos": 0, "skipped_done": 5, "unreadable": 0, "failed": 0}
    assert (out / "clips-00000-of-00001.jsonl").read_text() == before


def test_sharded_runs_cover_every_video_once(videos, tmp_path):
    out = tmp_path / "out"
    sources = [it.source for it in list_inputs(str(videos), (".mp4",))]
    assert sorted({shard_of(s, 2) for s in sources}) == [0, 1]  # both workers get work
    latin1 = os.fsdecode(b"/raw/caf\xe9.mp4")  # not UTF-8: os.walk gives it with surrogates
    assert shard_of(latin1, 2) == shard_of(latin1, 2) in (0, 1)
    assert run_cli(_args(videos, out, 1, 2)) == 0
    assert not (out / "clips.jsonl").exists()  # worker 0 has not finished yet
    assert run_cli(_args(videos, out, 0, 2)) == 0
    per_worker = [{ln["source"] for ln in ledger.read_ledger(str(out / f"clips-{i:05d}-of-00002.jsonl"))}
                  for i in range(2)]
    print("shard split:", [sorted(w) for w in per_worker])
    assert per_worker[0].isdisjoint(per_worker[1])
    assert per_worker[0] | per_worker[1] == set(sources)
    merged = _lines(out / "clips.jsonl")
    assert {ln["source"] for ln in merged} == set(sources) and len(merged) == 13
    kept = [ln for ln in merged if ln["kept"]]
    assert len(records.ClipShardSource(str(out))) == len(kept) > 0
    for ln in kept:  # each worker wrote its own part files
        assert f"-{shard_of(ln['source'], 2):05d}-of-00002-part-" in ln["shard_file"]
    with pytest.raises(ValueError, match="already holds a curate run with --num-shards"):
        run_cli(_args(videos, out, 0, 1))
    with pytest.raises(ValueError, match="--shard 2 is outside"):
        run_cli(_args(videos, tmp_path / "other", 2, 2))


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes(videos, tmp_path):
    """A crash part way leaves a consistent output; the rerun finishes only what is missing,
    and part files no ledger line points at are deleted."""
    out = tmp_path / "out"
    config = load_config(default_config_path(), [*QUIET, "--config.curate.output.clips_per_file=1"])
    calls = []

    def captioner(frames, caption):
        calls.append(len(frames))
        if len(calls) == 5:  # the 5th kept clip: inside the second video
            raise KeyboardInterrupt
        return "recaptioned"

    with pytest.raises(KeyboardInterrupt):
        curate(config, str(videos), str(out), captioner=captioner)
    first = ledger.read_ledger(str(out / "clips-00000-of-00001.jsonl"))
    done = {ln["source"] for ln in first if ln["last_segment"]}
    assert len(done) == 2 and not (out / "clips.jsonl").exists()  # broken.mp4 and one video
    orphan = records.part_path(str(out), 0, 1, 99)
    with open(orphan, "wb") as f:
        f.write(b"half-written")
    summary = curate(config, str(videos), str(out), captioner=lambda f, c: "again")
    assert summary["this_run"]["videos"] == 3 and summary["this_run"]["skipped_done"] == 2
    assert not os.path.exists(orphan)
    lines = _lines(out / "clips.jsonl")
    keys = [(ln["source"], ln.get("start_frame")) for ln in lines]
    assert len(keys) == len(set(keys)) == 13  # every clip exactly once
    kept = [ln for ln in lines if ln["kept"]]
    assert len(records.ClipShardSource(str(out))) == len(kept)
    assert {ln["recaption"] for ln in kept} == {"recaptioned", "again"}
    assert len(records.worker_parts(str(out), 0, 1)) == len({ln["source"] for ln in kept})


def test_torn_ledger_append_is_redone(videos, tmp_path):
    """A crash mid-append (the last line torn) loses no clip: the whole interrupted batch is
    curated again, and the next append does not glue onto the fragment."""
    out = tmp_path / "out"
    config = load_config(default_config_path(), QUIET)
    first = curate(config, str(videos), str(out))
    path = out / "clips-00000-of-00001.jsonl"
    text = path.read_text()
    path.write_text(text[:len(text) - len(text.splitlines()[-1]) // 2])  # tear the last line
    again = curate(config, str(videos), str(out))
    assert again["this_run"]["videos"] >= 1
    assert (again["clips"], again["kept"]) == (first["clips"], first["kept"])
    lines = _lines(path)[1:]  # every line whole JSON, after the header
    keys = [(ln["source"], ln.get("start_frame")) for ln in lines]
    assert len(keys) == len(set(keys))
    assert len(records.ClipShardSource(str(out))) == first["kept"]
    assert curate(config, str(videos), str(out))["this_run"]["videos"] == 0
    assert not any("batch_end" in ln or "vdit_ledger" in ln for ln in _lines(out / "clips.jsonl"))
    # a ledger from before batches (no header, no marks) keeps every whole line: nothing redone
    path.write_text("".join(json.dumps(ln) + "\n" for ln in ledger.read_ledger(str(path))))
    again = curate(config, str(videos), str(out))
    assert again["this_run"]["videos"] == 0 and again["clips"] == first["clips"]
    assert len(records.ClipShardSource(str(out))) == first["kept"]


def test_manifest_input_captions_and_scorers(videos, tmp_path):
    manifest = tmp_path / "list.jsonl"
    rel = os.path.relpath(videos, tmp_path)
    manifest.write_text(json.dumps({"path": f"{rel}/v1.mp4", "caption": "from the manifest"})
                        + "\n\n" + json.dumps({"path": str(videos / "v0.mp4")}) + "\n")

    class Scorer:  # a user-supplied learned scorer
        name, threshold = "toy", 0.5

        def __call__(self, frames, caption):
            return float(frames.mean() > 90)

    config = load_config(default_config_path(), QUIET)
    summary = curate(config, str(manifest), str(tmp_path / "out"), scorers=[Scorer()])
    lines = _lines(tmp_path / "out" / "clips.jsonl")
    assert summary["videos"] == 2 and len(lines) == 6
    assert {ln["caption"] for ln in lines if ln["source"].endswith("v1.mp4")} == {
        "from the manifest"}
    assert {ln["caption_source"] for ln in lines if ln["source"].endswith("v0.mp4")} == {
        "sidecar"}
    assert all("toy" in ln for ln in lines)
    assert all(("toy" in ln["reasons"]) == (ln["toy"] is not None and ln["toy"] < 0.5)
               for ln in lines)
    assert any(ln["toy"] is not None for ln in lines)
    manifest.write_text('{"caption": "no path"}\n')
    with pytest.raises(ValueError, match="line 1: expected an object with a \"path\""):
        list_inputs(str(manifest), (".mp4",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty' holds no videos"):
        curate(config, str(tmp_path / "empty"), str(tmp_path / "out2"))
    with pytest.raises(ValueError, match="--num-shards 0: expected a count >= 1"):
        curate(config, str(videos), str(tmp_path / "out2"), 0, 0)
    with pytest.raises(FileNotFoundError, match="expected a folder of videos or a .jsonl"):
        list_inputs(str(tmp_path / "missing"), (".mp4",))


def test_long_video_in_segments_with_crop_and_resize(tmp_path):
    """A 6 s letterboxed video read in 2.5 s segments; clips keep absolute frame numbers,
    bars are cropped and frames downscaled in the shards."""
    inp = tmp_path / "in"
    inp.mkdir()
    content = ct.pan(0.5, frames=72, height=64, width=96)
    boxed = np.zeros((72, 96, 96, 3), np.uint8)
    boxed[:, 16:80] = content
    write_mp4(inp / "long.mp4", boxed, FPS)
    overrides = [*QUIET, "--config.curate.decode.max_segment_seconds=2.5",
                 "--config.curate.output.short_side=32"]
    assert run_cli(_args(inp, tmp_path / "out", overrides=overrides)) == 0
    lines = _lines(tmp_path / "out" / "clips.jsonl")
    assert [(ln["segment"], ln["start_frame"], ln["end_frame"], ln["last_segment"])
            for ln in lines] == [(0, 0, 30, False), (1, 30, 60, False), (2, 60, 72, True)]
    assert all(ln["box"] == [16, 16, 0, 0] for ln in lines)
    source = records.ClipShardSource(str(tmp_path / "out"))
    kept = [source[i] for i in range(len(source))]
    assert [r["frames"].shape for r in kept] == [(30, 32, 48, 3), (30, 32, 48, 3),
                                                  (12, 32, 48, 3)]
    decode = load_config(default_config_path(), ["--config.curate.decode.short_side=48"])
    segments = list(iter_segments(inp / "long.mp4", decode.curate.decode))
    assert [(s.start_frame, s.frames.shape, s.last) for s in segments] == [
        (0, (72, 48, 48, 3), True)]


def test_a_video_that_fails_analysis_is_recorded_not_fatal(videos, tmp_path):
    class Flaky:
        name, threshold = "flaky", 0.0

        def __call__(self, frames, caption):
            if caption:  # only v0 has a (sidecar) caption
                raise RuntimeError("scorer blew up")
            return 1.0

    config = load_config(default_config_path(), QUIET)
    summary = curate(config, str(videos), str(tmp_path / "out"), scorers=[Flaky()])
    assert summary["this_run"]["failed"] == 1 and summary["failed"] == ["v0.mp4"]
    lines = _lines(tmp_path / "out" / "clips.jsonl")
    failed = [ln for ln in lines if ln["source"] == "v0.mp4"]
    assert len(failed) == 1 and failed[0]["reason"] == "failed"
    assert "RuntimeError: scorer blew up" in failed[0]["error"]
    assert ledger.summarize(lines)["clips"] == 9  # the three other videos' clips
    assert "failed videos" in ledger.format_summary(summary)


def test_a_full_output_stops_the_run_blaming_no_video(videos, tmp_path, monkeypatch):
    """A part file that cannot be written (disk full) is the output's fault, not the video's:
    the run stops naming the file (every later video would fail alike), no video is recorded as
    failed, and a rerun on a writable output curates everything."""
    def full(path, clips):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records, "write_clip_file", full)
    config = load_config(default_config_path(), [*QUIET, "--config.curate.output.clips_per_file=1"])
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"cannot write .*part.*No space left on device.*Rerun"):
        curate(config, str(videos), str(out))
    assert not any(ln["reason"] == "failed" for path in out.glob("*.jsonl") for ln in _lines(path))
    monkeypatch.undo()
    summary = curate(config, str(videos), str(out))
    assert summary["this_run"]["failed"] == 0 and summary["clips"] == 12
