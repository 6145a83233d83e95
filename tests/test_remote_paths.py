"""Cloud paths: the whole shapes chain (train-vae -> encode -> train -> sample -> eval) with every
path on gs://, served by tests/remote_fs.py through the code path real GCS takes (etils.epath's
fsspec backend, Orbax's TensorStore kvstore); bad schemes and missing buckets fail up front."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from remote_fs import install
from train_testing import VIDEOS, tiny_config, write_shards

from vdit import cli, runs
from vdit.data import pipeline, sources
from vdit.data.video_io import write_mp4

ROOT = os.path.join(os.path.dirname(__file__), "..")
VAE = ["--config.vae.base_dim=8", "--config.vae.num_res_blocks=0",
       "--config.vae_train.steps=2", "--config.vae_train.batch_size=2",
       "--config.vae_train.shapes=[(5, 16, 16)]", "--config.vae_train.eval_examples=2",
       "--config.train.progress=False", "--config.checkpoint.async_save=False",
       "--config.optim.warmup_steps=0"]
DIT = ["--config.vae.base_dim=8", "--config.vae.num_res_blocks=0",
       "--config.model.num_layers=1", "--config.model.num_attention_heads=2",
       "--config.model.attention_head_dim=8", "--config.model.ffn_dim=32",
       "--config.model.text_dim=16", "--config.model.freq_dim=16",
       "--config.text.d_model=16", "--config.text.d_kv=8", "--config.text.d_ff=32",
       "--config.text.num_layers=1", "--config.text.num_heads=2",
       "--config.data.tokens_per_row=48", "--config.data.rows_per_batch=8",
       "--config.data.prefetch=0", "--config.train.progress=False", "--config.train.log_every=1",
       "--config.train.steps=2", "--config.optim.warmup_steps=0", "--config.checkpoint.every=2",
       "--config.checkpoint.async_save=False", "--config.encode.num_examples=8",
       "--config.encode.num_shards=2", "--config.encode.batch_size=4",
       "--config.encode.shapes=[(5, 16, 16)]", "--config.encode.shape_weights=[]",
       "--config.sample.frames=5", "--config.sample.height=16", "--config.sample.width=16",
       "--config.sample.steps=2"]


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """gs://bucket served from tmp_path/gcs/bucket; the test runs in an empty local folder, so a
    gs:// path taken for a local one would show up there as a folder named 'gs:'."""
    root = tmp_path / "gcs"
    (root / "bucket").mkdir(parents=True)
    install(monkeypatch, str(root))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return root / "bucket", cwd


def test_curate_writes_its_clip_list_on_gcs(gcs, tmp_path, capsys):
    """The worker's done marker went to a local folder 'gs:', so clips.jsonl was never merged
    in the bucket (and the lock and the printed output path were local too)."""
    bucket, cwd = gcs
    videos = tmp_path / "videos"
    videos.mkdir()
    frames = np.random.default_rng(0).integers(0, 255, (1, 64, 96, 3), dtype=np.uint8)
    write_mp4(videos / "v.mp4", np.concatenate([np.roll(frames, 2 * i, axis=2) for i in range(30)]),
              12.0)
    assert cli.main(["curate", "--input", str(videos), "--output", "gs://bucket/clips",
                     "--config.curate.output.progress=False"]) == 0
    assert "output gs://bucket/clips" in capsys.readouterr().out
    assert {"clips.jsonl", "clips-00000-of-00001.done"} <= set(os.listdir(bucket / "clips"))
    assert os.listdir(cwd) == []


def test_gcs_latents_that_do_not_fit_the_local_disk_are_refused_up_front(gcs, monkeypatch):
    """Every host copies every gs:// shard before step 1 (ArrayRecord reads local files): at
    pod scale (100k 480p clips: ~0.8 TB) that filled the disk part way through the copy."""
    bucket, cwd = gcs
    write_shards(str(bucket / "latents"), VIDEOS)
    assert len(sources.LatentShardSource("gs://bucket/latents")) == 16  # fits: copied, read
    usage = shutil.disk_usage(str(cwd))
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(OSError, match=r"1 latent shards under gs://bucket/latents hold .* GiB.*"
                                      r"0\.0 GiB free: mount the bucket \(e\.g\. gcsfuse\)"):
        sources.LatentShardSource("gs://bucket/latents")


def test_each_host_copies_its_own_share_of_gcs_shards(gcs, caplog):
    """Shards split between the processes when the shares come out even: each host copies and
    packs only its share, and together the hosts read every clip. Shares that would differ (every
    host packs the same rows a step, so a smaller share repeats its clips more often) or stay
    empty: all copied, records strided, said."""
    bucket, _ = gcs
    for k in range(4):
        write_shards(str(bucket / "latents"), VIDEOS, count=4, seed=k)
        os.rename(bucket / "latents" / "latents-00000-of-00001.array_record",
                  bucket / "latents" / f"part-{k}.array_record")
    paths = sources.shard_paths("gs://bucket/latents")
    config = tiny_config("shapes_dit", "unused", "--config.data.rows_per_batch=2",
                         "--config.data.tokens_per_row=64", "--config.data.prefetch=0").data
    shares = []
    for index in range(2):
        mine, own = sources.process_shards(paths, index, 2)
        assert own and len(mine) == 2
        source = sources.LatentShardSource(mine)
        assert [os.path.basename(p).split("-", 1)[1] for p in source._local] == [
            os.path.basename(p) for p in mine]
        share = {round(float(source[i]["latents"].sum()), 1) for i in range(len(source))}
        assert len(share) == len(source) == 8
        packed = set()  # a segment's token sum is its clip's latent sum
        for batch, _ in zip(pipeline.packed_dataset(source, config, (1, 2, 2),
                                                    np.zeros(1, np.int32), index, 2,
                                                    own_share=True), range(16)):
            assert batch["tokens"].shape[0] == 1  # this host's half of the global rows
            seg = batch["segment_ids"][0]
            packed |= {round(float(batch["tokens"][0][seg == k].sum()), 1)
                       for k in range(1, seg.max() + 1)}
        assert packed == share
        shares.append(share)
    everything = sources.LatentShardSource(paths)
    assert shares[0] | shares[1] == {round(float(everything[i]["latents"].sum()), 1)
                                     for i in range(16)}
    assert sources.process_shards(paths[:3], 1, 2) == (paths[:3], False)  # 8 clips against 4
    assert "3 remote latent shards do not split evenly over 2 processes" in caplog.text
    assert sources.process_shards(paths, 1, 8) == (paths, False)  # empty shares
    assert sources.process_shards(["/local/a", "/local/b"], 1, 2) == (["/local/a", "/local/b"],
                                                                      False)


def test_shapes_chain_on_gcs(gcs, capsys):
    bucket, cwd = gcs
    vae, dit = "gs://bucket/runs/vae", "gs://bucket/runs/dit"
    shapes_vae, shapes_dit = (os.path.join(ROOT, "configs", n) for n in ("shapes_vae.py",
                                                                          "shapes_dit.py"))
    assert cli.main(["train-vae", "--config", shapes_vae, "--workdir", vae, *VAE]) == 0
    dit_args = ["--config", shapes_dit, "--workdir", dit, *DIT,
                f"--config.encode.vae_workdir={vae}"]
    assert cli.main(["encode", *dit_args]) == 0
    assert cli.main(["train", *dit_args, "--config.train.tensorboard=True"]) == 0
    assert cli.main(["sample", "--workdir", dit, "--prompt", "a red circle moving right",
                     "--frames", "5", "--size", "16x16", "--steps", "2",
                     "--out", "gs://bucket/out/red.mp4"]) == 0
    assert cli.main(["eval", "shapes", "--workdir", dit, "--samples", "2",
                     "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "color" in out  # the judge's table

    assert os.listdir(cwd) == []  # nothing landed in a local 'gs:' folder
    run = bucket / "runs" / "dit"
    assert sorted(p.name for p in (run / "latents").iterdir()) == [
        "latents-00000-of-00002.array_record", "latents-00001-of-00002.array_record", "stats.json"]
    assert (run / "checkpoints" / "2").is_dir()
    assert (bucket / "runs" / "vae" / "checkpoints").is_dir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert any(p.name.startswith("events.out") for p in (run / "tensorboard").iterdir())
    assert (bucket / "out" / "red.mp4").stat().st_size > 0
    lines = (run / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all((run / "eval" / json.loads(x)["file"]).is_file() for x in lines)


@pytest.mark.parametrize("path, message", [
    ("ftp://host/runs/dit", "unsupported scheme ftp://"),
    ("gs:/bucket/runs/dit", "a remote path starts with gs:// (two slashes)"),
    ("gs://no-such-bucket/runs/dit", "gs://no-such-bucket"),
])
def test_bad_paths_fail_before_work(gcs, capsys, path, message):
    _, cwd = gcs
    code = cli.main(["train", "--config", os.path.join(ROOT, "configs", "shapes_dit.py"),
                     "--workdir", path])
    err = capsys.readouterr().err
    assert code == 1 and path in err and message in err
    assert os.listdir(cwd) == []


def test_user_path_checks():
    assert str(runs.user_path("gs://b/x") / "y") == "gs://b/x/y"
    with pytest.raises(ValueError, match="memory://x"):
        runs.user_path("memory://x", "--out")
    assert runs.is_absolute("gs://b/x") and not runs.is_absolute("runs/x")
