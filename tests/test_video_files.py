"""Encoding video files: folder/manifest sources, shape buckets, skipped videos counted, resume,
the CLI dispatch, the Grain pipeline reading the result, and `vdit curate`'s clips.jsonl as the
source (frame ranges, dropped clips filtered, captions and motion carried)."""

import dataclasses
import json
import os

import curate_testing as ct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from vdit import cli
from vdit.config import ConfigError, load_config
from vdit.curate.run import curate
from vdit.curate.settings import default_config_path
from vdit.data import clip_decode, pipeline, sources, video_files, video_io
from vdit.data.counter_video import write_counter_video
from vdit.data.encode_videos import SUMMARY_FILE, encode_videos
from vdit.models.vae_config import vae_from_config
from vdit.runs import checkpoint

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_dit.py")
SHAPES = "[(9, 32, 32), (5, 32, 48), (1, 32, 32)]"
TINY = ["--config.vae.base_dim=8", "--config.vae.num_res_blocks=0", f"--config.encode.shapes={SHAPES}",
        "--config.encode.shape_weights=[0.4, 0.3, 0.3]", "--config.encode.batch_size=2",
        "--config.encode.num_shards=2", "--config.encode.normalize='measure'",
        "--config.train.progress=False", "--config.text.max_length=32",
        "--config.encode.fps=0.0"]  # consecutive source frames: the checks count frames
CAPTIONS = ["a red circle moving right", "a blue square", "", "green triangle moving up"]
# A config file with the `encode.source` key (the recipe may not carry it yet).
CONFIG_FILE = """from vdit.config import recipe


def get_config():
    config = recipe("shapes_dit")
    config.encode.source = "synthetic"
    return config
"""


def _video(seed: int, frames: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(1, 32, 48, 3)).astype(np.float32)
    ramp = np.linspace(0, 60, frames)[:, None, None, None]
    return np.clip(base + ramp, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """4 good videos (12 frames 32x48), one 3-frame video, one corrupt .mp4; a folder with .txt
    sidecars and a manifest (in a sub-folder, relative paths) listing the same files."""
    folder = tmp_path_factory.mktemp("videos")
    names = []
    for i, caption in enumerate(CAPTIONS):
        name = f"clip{i}.mp4"
        video_io.write_mp4(folder / name, _video(i, 12), fps=8.0)
        if caption:
            (folder / f"clip{i}.txt").write_text(caption + "\n")
        names.append(name)
    video_io.write_mp4(folder / "short.mp4", _video(9, 3), fps=8.0)
    (folder / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    names += ["short.mp4", "broken.mp4"]
    lines = [{"file": f"../{n}", "caption": f"caption of {n}", "motion": i / 10}
             for i, n in enumerate(names)]
    (folder / "lists").mkdir()
    manifest = folder / "lists" / "clips.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return {"folder": str(folder), "manifest": str(manifest), "names": names}


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory):
    """A tiny random VAE saved as a run's EMA weights (what `encode.vae_workdir` points at)."""
    workdir = str(tmp_path_factory.mktemp("vae"))
    config = load_config(CONFIG, TINY)
    vae = vae_from_config(config.vae)
    shapes = jax.eval_shape(lambda: meta.unbox(vae.init(jax.random.key(0),
                                                        jnp.zeros((1, 1, 4, 4, 3))))["params"])
    rng = np.random.default_rng(0)  # random weights without compiling an init: only shapes matter
    params = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    config.checkpoint.async_save = False
    manager = checkpoint.make_manager(workdir, config.checkpoint, with_data=False)
    checkpoint.save(manager, 1, {"ema": params}, config)
    manager.wait_until_finished()
    return workdir


def _config(source, vae_workdir, *extra):
    config = load_config(CONFIG, TINY + [f"--config.encode.vae_workdir={vae_workdir}", *extra])
    config.encode.source = source
    return config


def test_clips_of_one_video_share_its_packet_scan(tmp_path, monkeypatch):
    """The scan reads the whole file: a curated manifest's many clips of one long video read it
    once, not once a clip."""
    path = tmp_path / "long.mp4"
    write_counter_video(path, 60, 12.0, 32, 96)
    scans = []
    scan = clip_decode.VideoReader._scan_packets
    monkeypatch.setattr(clip_decode.VideoReader, "_scan_packets",
                        lambda self: scans.append(self.path) or scan(self))
    entries = [video_files.VideoEntry(str(path), "", f"clip{i}", frames=(10 * i, 10 * i + 20))
               for i in range(4)]
    source = video_files.VideoClipSource(entries, [(5, 16, 16)])
    firsts = [source[i]["meta"]["first_frame"] for i in range(4)]
    assert len(scans) == 1 and firsts == [7, 17, 27, 37]


def test_a_broken_link_is_an_entry_with_its_error(tmp_path):
    """Skipped and counted like any unreadable video, not left out of the listing unseen."""
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "gone.mp4")
    entries = video_files.list_folder(tmp_path)
    assert [(e.key, bool(e.error)) for e in entries] == [("a.mp4", False), ("b.mp4", True)]
    assert "b.mp4 is a link to a missing file" in entries[1].error


def test_folder_and_manifest_entries(videos):
    folder = video_files.list_source(videos["folder"])[0]
    assert [e.key for e in folder] == sorted(videos["names"])
    captions = {e.key: e.caption for e in folder}
    assert captions["clip0.mp4"] == CAPTIONS[0] and captions["clip2.mp4"] == ""
    manifest = video_files.list_source(videos["manifest"])[0]
    assert [e.key for e in manifest] == [f"../{n}" for n in videos["names"]]
    assert manifest[1].caption == "caption of clip1.mp4" and manifest[1].meta == {"motion": 0.1}
    assert os.path.isfile(manifest[0].file)


def test_clips_take_the_drawn_shape_and_fail_clearly(videos):
    entries = video_files.list_source(videos["manifest"])[0]
    src = video_files.VideoClipSource(entries, [(9, 32, 32), (5, 16, 24), (1, 32, 32)], None, 3)
    for i in range(4):
        clip = src[i]
        assert clip["video"].shape == (*src.shape(i), 3) and clip["video"].dtype == np.float32
        assert clip["meta"]["file"] == f"../clip{i}.mp4" and clip["meta"]["source_frames"] == 12
    assert src.clip(4, (1, 32, 32))["meta"]["first_frame"] == 1  # the middle of 3 frames
    with pytest.raises(video_files.ClipTooShortError, match="3 frames; the clip needs 5"):
        src.clip(4, (5, 32, 32))
    with pytest.raises(video_io.VideoReadError, match="broken.mp4"):
        src.clip(5, (1, 32, 32))
    np.testing.assert_array_equal(video_files.clip_indices(12, 8.0, 5, 4.0), [2, 4, 6, 8, 10])
    np.testing.assert_array_equal(video_files.clip_indices(12, 8.0, 5, 0.0), [3, 4, 5, 6, 7])


def test_an_unreadable_caption_skips_its_video_only(tmp_path):
    """A sidecar that is not UTF-8 fails that video when it is loaded (encode skips and counts
    it as "error"), never the listing of the folder."""
    for name in ("good", "bad"):
        video_io.write_mp4(tmp_path / f"{name}.mp4", _video(5, 3), fps=8.0)
    (tmp_path / "good.txt").write_text("a caption\n")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    bad, good = video_files.list_folder(tmp_path)
    assert (good.caption, good.error) == ("a caption", "")
    src = video_files.VideoClipSource([bad, good], [(1, 32, 32)])
    assert src[1]["caption"] == "a caption"
    with pytest.raises(ValueError, match=r"caption file .*bad\.txt: UnicodeDecodeError"):
        src[0]


def test_bad_sources_are_errors_naming_them(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "a.mp4"}\n{"caption": "no file"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2.*\"file\""):
        video_files.list_source(str(bad))[0]
    with pytest.raises(FileNotFoundError, match="encode.source"):
        video_files.list_source(str(tmp_path / "missing"))[0]
    with pytest.raises(FileNotFoundError, match="lists no videos"):
        video_files.list_source(str(tmp_path))[0]
    config = _config(str(tmp_path), "", "--config.encode.shapes=[(8, 32, 32)]")
    with pytest.raises(ConfigError, match=r"encode.shapes\[0\].frames"):
        encode_videos(config, str(tmp_path / "out"))


def _expected(config, videos, manifest: bool):
    """(kept clips {key: (shape, caption)}, skipped count) predicted from the drawn shapes."""
    entries = video_files.list_source(videos["manifest" if manifest else "folder"])[0]
    src = video_files.VideoClipSource.from_config(config.encode)
    kept, skipped = {}, 0
    for i, entry in enumerate(entries):
        frames = src.shape(i)[0]
        if entry.key.endswith("broken.mp4") or (entry.key.endswith("short.mp4") and frames > 3):
            skipped += 1
        else:
            kept[entry.key] = (src.shape(i), entry.caption)
    return kept, skipped


def _records(folder):
    src = sources.LatentShardSource(folder)
    return [src[i] for i in range(len(src))]


def test_encode_manifest_resumes_and_feeds_the_pipeline(videos, vae_workdir, tmp_path):
    out = str(tmp_path / "latents")
    config = _config(videos["manifest"], vae_workdir)
    config.encode.i2v_condition = True
    summary = encode_videos(config, out)
    kept, skipped = _expected(config, videos, manifest=True)
    assert summary["skipped"] == skipped and summary["records"] == len(kept) == 6 - skipped
    assert "../broken.mp4" in summary["skipped_files"]
    assert summary["skipped_by_reason"]["unreadable"] == 1
    assert len(summary["paths"]) == 2 and all(os.path.isfile(p) for p in summary["paths"])
    records = _records(out)
    assert {r["meta"]["file"] for r in records} == set(kept)
    for r in records:
        (frames, height, width), caption = kept[r["meta"]["file"]]
        assert r["latents"].shape == (1 + (frames - 1) // 4, height // 4, width // 4, 8)
        assert r["cond_latents"].shape == r["latents"].shape[:3] + (4 + 8,)
        assert r["caption"] == caption and np.all(np.isfinite(r["latents"]))
        assert "motion" in r["meta"] and r["text"].dtype == np.int32
    stamps = [os.path.getmtime(p) for p in summary["paths"]]
    again = encode_videos(config, out)
    assert [os.path.getmtime(p) for p in again["paths"]] == stamps
    assert again["skipped"] == skipped and again["records"] == summary["records"]
    data = config.data.copy_and_resolve_references()
    data.update(dict(tokens_per_row=96, text_per_row=128, rows_per_batch=2, prefetch=0))
    src = sources.SkippingSource(sources.LatentShardSource(out))
    batch = next(iter(pipeline.packed_dataset(src, data, (1, 2, 2), np.array([1], np.int32), 0, 1)))
    assert batch["tokens"].shape == (2, 96, 32) and (batch["segment_ids"] > 0).any()


def test_cli_encodes_a_folder(videos, vae_workdir, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(CONFIG_FILE)
    workdir = str(tmp_path / "run")
    argv = ["encode", "--config", str(cfg_file), "--workdir", workdir, *TINY,
            f"--config.encode.vae_workdir={vae_workdir}",
            f"--config.encode.source={videos['folder']}", "--config.encode.normalize='config'"]
    assert cli.main(argv) == 0
    config = load_config(str(cfg_file), argv[5:])
    kept, skipped = _expected(config, videos, manifest=False)
    out = capsys.readouterr().out
    assert f"{len(kept)} clips in 2 shards" in out and f"skipped {skipped} videos" in out
    with open(os.path.join(workdir, "latents", SUMMARY_FILE)) as f:
        shards = json.load(f)["shards"]
    assert sum(len(s["skipped"]) for s in shards.values()) == skipped
    records = _records(os.path.join(workdir, "latents"))
    assert {r["meta"]["file"]: r["caption"] for r in records} == {k: c for k, (_, c) in kept.items()}


RED, BLUE = (1.0, 0.35, 0.35), (0.35, 0.35, 1.0)
ONE_SHAPE = ["--config.encode.shapes=[(9, 32, 32)]", "--config.encode.shape_weights=[1.0]",
             "--config.encode.num_shards=1", "--config.encode.normalize='config'"]


def _tint(video: np.ndarray, weights) -> np.ndarray:
    return np.clip(video * np.asarray(weights, np.float32), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """`vdit curate` over a folder: halves.mp4 (a red shot, a hard cut at frame 24, a blue shot;
    a caption per shot in its sidecar), still.mp4 (one frozen frame: dropped as static) and
    broken.mp4 (unreadable); clips.jsonl lands in another folder, as in a real run."""
    folder = tmp_path_factory.mktemp("raw")
    red, blue = ct.scenes(2, 24, 12.0)
    video_io.write_mp4(folder / "halves.mp4", np.concatenate([_tint(red, RED), _tint(blue, BLUE)]), 12.0)
    (folder / "halves.json").write_text(json.dumps({"captions": [
        {"start": 0, "end": 2, "caption": "a red scene"},
        {"start": 2, "end": 4, "caption": "a blue scene"}]}))
    video_io.write_mp4(folder / "still.mp4", np.repeat(red[:1], 24, axis=0), 12.0)
    (folder / "broken.mp4").write_bytes(b"\0" * 500)
    out = tmp_path_factory.mktemp("curated")
    curate(load_config(default_config_path(), ["--config.curate.output.progress=False"]),
           str(folder), str(out))
    lines = [json.loads(t) for t in (out / "clips.jsonl").read_text().splitlines()]
    kept = [ln for ln in lines if ln["kept"]]
    # What the checks below rely on: curate cut halves.mp4 at frame 24 and kept both shots only.
    assert [(ln["source"], ln["start_frame"], ln["end_frame"]) for ln in kept] == [
        ("halves.mp4", 0, 24), ("halves.mp4", 24, 48)]
    assert len(lines) == 4 and [ln["caption"] for ln in kept] == ["a red scene", "a blue scene"]
    return {"folder": str(folder), "manifest": str(out / "clips.jsonl"), "kept": kept}


def test_curate_manifest_clips_come_from_their_frame_range(curated):
    with pytest.raises(FileNotFoundError, match="none of the videos.*encode.video_root"):
        video_files.list_source(curated["manifest"])  # curate's sources are input-relative
    entries, filtered = video_files.list_source(curated["manifest"], root=curated["folder"])
    assert filtered == 2 and [e.frames for e in entries] == [(0, 24), (24, 48)]
    src = video_files.VideoClipSource(entries, [(9, 32, 32)], filtered=filtered)
    for i, (line, channel) in enumerate(zip(curated["kept"], (0, 2), strict=True)):
        clip = src[i]
        rgb = clip["video"].mean(axis=(0, 1, 2))
        assert rgb[channel] - rgb[2 - channel] > 0.3, (i, rgb)  # red shot red, blue shot blue
        meta = clip["meta"]
        assert clip["caption"] == line["caption"] and meta["motion"] == line["motion"] > 0
        assert meta["fps"] == 12.0 and meta["source_frames"] == 24
        assert meta["first_frame"] == line["start_frame"] + (24 - 9) // 2
    whole = video_files.VideoClipSource([dataclasses.replace(entries[0], frames=None)], [(9, 32, 32)])
    assert whole[0]["meta"]["first_frame"] == (48 - 9) // 2  # no range: the middle of the video


def test_manifest_frame_ranges_and_kept_flags_fail_clearly(videos, tmp_path):
    lines = [{"source": "clip0.mp4", "start_frame": 2, "end_frame": 7, "kept": True},
             {"source": "clip1.mp4", "start_frame": 8, "end_frame": 20},
             {"source": "clip2.mp4", "kept": False}]
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    entries, filtered = video_files.read_manifest(manifest, videos["folder"])
    assert filtered == 1 and [e.key for e in entries] == ["clip0.mp4", "clip1.mp4"]
    src = video_files.VideoClipSource(entries, [(5, 32, 32)])
    assert src[0]["meta"]["first_frame"] == 2 and src[0]["meta"]["source_frames"] == 5
    with pytest.raises(video_files.ClipTooShortError, match=r"frames \[2, 7\) has 5 frames"):
        src.clip(0, (9, 32, 32))
    with pytest.raises(video_files.FrameRangeError, match=r"has 12 frames.*\[8, 20\)"):
        src.clip(1, (1, 32, 32))
    for bad, match in [({"start_frame": 5, "end_frame": 5}, "start_frame.*end_frame"),
                       ({"start_frame": 3}, "start_frame"), ({"kept": "no"}, "kept")]:
        manifest.write_text(json.dumps({"source": "clip0.mp4", **bad}) + "\n")
        with pytest.raises(ValueError, match=rf"clips.jsonl line 1.*{match}"):
            video_files.read_manifest(manifest)


def test_encode_a_curate_manifest(curated, vae_workdir, tmp_path):
    config = _config(curated["manifest"], vae_workdir, *ONE_SHAPE)
    config.encode.video_root = curated["folder"]
    summary = encode_videos(config, str(tmp_path / "latents"))
    assert (summary["records"], summary["skipped"], summary["filtered"]) == (2, 0, 2)
    records = _records(str(tmp_path / "latents"))
    for record, line in zip(records, curated["kept"], strict=True):
        assert record["caption"] == line["caption"] and record["meta"]["motion"] == line["motion"]
        assert record["meta"]["first_frame"] == line["start_frame"] + 7
        assert record["meta"]["fps"] == 12.0 and record["latents"].shape == (3, 8, 8, 8)


def test_sharded_encode_merges_by_name_with_one_normalisation(videos, vae_workdir, tmp_path):
    """Two workers (`--shard i --num-shards 2`) over a 3-shard layout: each writes only its own
    shards and summary, the last one merges; reruns skip; bad shards/layouts/stats fail clearly."""
    out = str(tmp_path / "latents")
    config = _config(videos["manifest"], vae_workdir, "--config.encode.num_shards=3")
    second = encode_videos(config, out, shard=1, num_shards=2)
    assert [os.path.basename(p) for p in second["paths"]] == ["latents-00001-of-00003.array_record"]
    assert not second["complete"] and not os.path.exists(os.path.join(out, SUMMARY_FILE))
    first = encode_videos(config, out, shard=0, num_shards=2)
    assert [os.path.basename(p)[:14] for p in first["paths"]] == ["latents-00000-", "latents-00002-"]
    assert first["complete"] and first["shards"] == 3
    kept, skipped = _expected(config, videos, manifest=True)
    assert {r["meta"]["file"] for r in _records(out)} == set(kept)
    assert first["skipped"] + second["skipped"] == skipped
    with open(os.path.join(out, SUMMARY_FILE)) as f:
        merged = json.load(f)["shards"]
    assert sorted(merged) == [f"latents-0000{i}-of-00003.array_record" for i in range(3)]
    assert len({entry["stats"] for entry in merged.values()}) == 1
    stamps = [os.path.getmtime(p) for p in first["paths"]]
    again = encode_videos(config, out, shard=0, num_shards=2)
    assert [os.path.getmtime(p) for p in again["paths"]] == stamps and again["complete"]
    with pytest.raises(ValueError, match=r"--shard 2 is outside \[0, --num-shards 2\)"):
        encode_videos(config, out, shard=2, num_shards=2)
    with pytest.raises(ValueError, match=r"already holds an encode into \[3\] shards, not 4"):
        encode_videos(config, out, shard=0, num_shards=4)
    worker = os.path.join(out, "encode_summary-00001-of-00002.json")
    with open(worker) as f:
        entries = json.load(f)
    entries["shards"]["latents-00001-of-00003.array_record"]["stats"] = "measured-elsewhere"
    with open(worker, "w") as f:
        json.dump(entries, f)
    with pytest.raises(ValueError, match=r"latents-00001-of-00003.*other latent stats"):
        encode_videos(config, out, shard=0, num_shards=2)


def test_cli_rejects_a_shard_outside_the_workers(capsys):
    assert cli.main(["encode", "--config", CONFIG, "--workdir", "unused", "--shard", "3",
                     "--num-shards", "2"]) != 0
    assert "--shard 3 is outside [0, --num-shards 2)" in capsys.readouterr().err


def _letterboxed(frames: int) -> np.ndarray:
    """[frames, 48, 48, 3]: a bright picture between 12-row black bars (top and bottom)."""
    video = np.zeros((frames, 48, 48, 3), np.uint8)
    video[:, 12:36] = _video(3, frames)[:, :24] // 2 + 120
    return video


def test_a_curated_box_keeps_black_bars_out_of_the_clip(tmp_path):
    """curate's `box` is in pixels of the line's height x width (its decoded size, here halved
    by decode.short_side): the clip is cut from inside the bars, not from the barred frame."""
    video_io.write_mp4(tmp_path / "lb.mp4", _letterboxed(12), fps=8.0)
    line = {"source": "lb.mp4", "start_frame": 0, "end_frame": 12, "kept": True,
            "box": [6, 6, 0, 0], "height": 24, "width": 24}
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(json.dumps(line) + "\n")
    entries = video_files.read_manifest(manifest)[0]
    video = video_files.VideoClipSource(entries, [(5, 32, 32)])[0]["video"]
    assert video.max(axis=-1).min() > 0.0  # every pixel is picture: no black row (-1) left
    assert entries[0].crop == clip_decode.ContentBox(6, 6, 0, 0, 24, 24)
    without = dataclasses.replace(entries[0], crop=None)
    assert video_files.VideoClipSource([without], [(5, 32, 32)])[0]["video"].max(axis=-1).min() < -0.8
    for bad in ([6, 6, 0], [12, 12, 0, 0], [6, -1, 0, 0]):
        manifest.write_text(json.dumps({**line, "box": bad}) + "\n")
        with pytest.raises(ValueError, match=r"clips.jsonl line 1: \"box\""):
            video_files.read_manifest(manifest)
    manifest.write_text(json.dumps({**line, "box": [0, 0, 0, 0]}) + "\n")
    assert video_files.read_manifest(manifest)[0][0].crop is None


def test_caption_key_picks_curate_recaption(videos, tmp_path):
    """`encode.caption_key` = "recaption" trains on curate's captioner text; the default stays
    "caption" (optional); a line without the chosen key, or none with text, is an error naming
    the key."""
    lines = [{"source": "clip0.mp4", "caption": "", "recaption": "a red ball bounces"},
             {"source": "clip1.mp4", "caption": "sidecar text", "recaption": "a blue cube"},
             {"source": "clip2.mp4"}]
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    default = video_files.read_manifest(manifest, videos["folder"])[0]
    assert [e.caption for e in default] == ["", "sidecar text"]
    config = _config(str(manifest), "", "--config.encode.shapes=[(1, 32, 32)]",
                     "--config.encode.shape_weights=[1.0]")
    config.encode.video_root = videos["folder"]
    config.encode.caption_key = "recaption"
    src = video_files.VideoClipSource.from_config(config.encode)
    assert [src[i]["caption"] for i in range(2)] == ["a red ball bounces", "a blue cube"]
    assert src[1]["meta"]["caption"] == "sidecar text" and "recaption" not in src[1]["meta"]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=r"clips.jsonl line 3: no \"recaption\".*encode.caption_key"):
        video_files.read_manifest(manifest, videos["folder"], caption_key="recaption")
    assert video_files.read_manifest(manifest, videos["folder"])[0][2].caption == ""
    manifest.write_text(json.dumps({"source": "clip0.mp4", "recaption": ""}) + "\n")
    with pytest.raises(ValueError, match=r"encode.caption_key.*empty 'recaption'"):
        video_files.list_source(str(manifest), root=videos["folder"], caption_key="recaption")


def test_a_rerun_with_other_inputs_is_refused_not_skipped(videos, vae_workdir, tmp_path):
    """A finished shard is skipped on a rerun only when it would hold the same clips: a grown
    manifest (same shard count, more clips per shard) or another encode.fps is an error naming
    the folder, never a silent success that leaves the new clips out."""
    manifest = tmp_path / "clips.jsonl"
    lines = [{"file": f"{videos['folder']}/clip{i}.mp4", "caption": f"clip {i}"} for i in range(3)]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    out = str(tmp_path / "latents")
    config = _config(str(manifest), vae_workdir, *ONE_SHAPE, "--config.encode.shapes=[(1, 32, 32)]")
    first = encode_videos(config, out)
    stamps = [os.path.getmtime(p) for p in first["paths"]]
    again = encode_videos(config, out)  # unchanged: resumes, rewrites nothing
    assert again["records"] == 2 and [os.path.getmtime(p) for p in again["paths"]] == stamps
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=r"latents.*latents-00000-of-00001.*encode into a new folder"):
        encode_videos(config, out)
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    config.encode.fps = 4.0
    with pytest.raises(ValueError, match=r"encode\.fps.*encode into a new folder"):
        encode_videos(config, out)
    # A summary from before fingerprints: checked by its clip count (records + skipped).
    config.encode.fps = 0.0
    with open(os.path.join(out, SUMMARY_FILE)) as f:
        saved = json.load(f)
    for entry in saved["shards"].values():
        del entry["fingerprint"]
    with open(os.path.join(out, SUMMARY_FILE), "w") as f:
        json.dump(saved, f)
    assert encode_videos(config, out)["records"] == 2
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=r"encode into a new folder"):
        encode_videos(config, out)
    assert [os.path.getmtime(p) for p in first["paths"]] == stamps
