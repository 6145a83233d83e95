"""Every failure of the command line is one clear line (plus a pointer to the traceback) and a
non-zero exit: a table of bad inputs through `vdit.cli.main`, each with the words its message must
hold and its exit status. Cases that need a trained run share one tiny run (module fixture)."""

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import test_train
from train_testing import TINY, VIDEOS, tiny_config, write_shards, write_vae_run

from vdit import cli
from vdit.data import sources
from vdit.runs import checkpoint

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
DIT = os.path.join(CONFIGS, "shapes_dit.py")
ROOT = os.path.join(os.path.dirname(__file__), "..")


def _png(path, size=8, truncate=False):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + bytes([120, 30, 200]) * size for _ in range(size))
    body = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(body[: len(body) // 2] if truncate else body)
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("clierr")
    latents = write_shards(str(root / "latents"), VIDEOS)
    with open(os.path.join(latents, "stats.json"), "w") as f:
        json.dump({"mean": [0.0] * 8, "std": [1.0] * 8}, f)
    vae = str(root / "vae")
    write_vae_run(vae, tiny_config("shapes_dit", latents))
    run = str(root / "run")  # a DiT run's layout; its (zero) weights are never sampled here
    manager = checkpoint.make_manager(run, tiny_config("shapes_dit", latents).checkpoint,
                                      with_data=False)
    weights = {"dit": {"w": np.zeros(2, np.float32)}}
    checkpoint.save(manager, 2, {"params": weights, "ema": weights},
                    tiny_config("shapes_dit", latents, f"--config.encode.vae_workdir={vae}"))
    manager.wait_until_finished()
    empty = root / "empty_shards"
    empty.mkdir()
    sources.write_shard(str(empty / "latents-00000-of-00001.array_record"), [])
    (root / "a_file").write_text("not a folder")
    (root / "notes.txt").write_text("hello")
    (root / "bad_config.py").write_text("def get_config(:\n    pass\n")
    (root / "prompts.bin").write_bytes(bytes(range(256)) * 4)
    (root / "fake.mp4").write_text("this is not a video")
    return {"root": str(root), "latents": latents, "vae": vae, "run": run, "empty": str(empty),
            "good_png": _png(root / "good.png"), "cut_png": _png(root / "cut.png", truncate=True)}


def _tiny(env, latents=None):
    return [*TINY, f"--config.data.latents_dir={latents or env['latents']}",
            f"--config.encode.vae_workdir={env['vae']}"]


def _sample(env, *extra):
    return ["sample", "--workdir", env["run"], "--prompt", "a red circle",
            "--out", os.path.join(env["root"], "out", "o.mp4"), *extra]


# (name, argv(env), words the error line must hold, exit status)
CASES = [
    ("steps -5", lambda e: ["train", "--config", DIT, "--workdir", e["root"] + "/w1",
                            "--config.train.steps=-5"], ["train.steps", "-5", ">= 1"], 1),
    ("batch-size -1", lambda e: _sample(e, "--batch-size", "-1"), ["--batch-size -1"], 1),
    ("batch-size 0", lambda e: _sample(e, "--batch-size", "0"), ["--batch-size 0"], 1),
    ("last-image without image", lambda e: _sample(e, "--last-image", e["good_png"]),
     ["--last-image needs --image"], 1),
    ("mode without video", lambda e: _sample(e, "--mode", "extend"), ["--mode extend needs --video"],
     1),
    ("context frames without extend", lambda e: _sample(e, "--context-frames", "3"),
     ["--context-frames needs --mode extend"], 1),
    ("strength without video", lambda e: _sample(e, "--image", e["good_png"], "--strength", "0.3"),
     ["--strength needs --video"], 1),
    ("plan hbm -1", lambda e: ["plan", "--config", DIT, "--hbm-gb", "-1"], ["--hbm-gb -1.0"], 1),
    ("plan hbm 0", lambda e: ["plan", "--config", DIT, "--hbm-gb", "0"], ["--hbm-gb 0.0"], 1),
    ("plan devices 0", lambda e: ["plan", "--config", DIT, "--devices", "0"], ["--devices 0"], 1),
    ("config syntax error", lambda e: ["train", "--config", e["root"] + "/bad_config.py",
                                       "--workdir", e["root"] + "/w2"],
     ["bad_config.py", "syntax error at line 1"], 1),
    ("workdir is a file", lambda e: ["train", "--config", DIT, "--workdir", e["root"] + "/a_file"],
     ["a_file", "is a file, not a folder"], 1),
    ("image is text", lambda e: _sample(e, "--image", e["root"] + "/notes.txt"),
     ["--image", "notes.txt", "not a readable image"], 1),
    ("image is a folder", lambda e: _sample(e, "--image", e["root"]),
     ["--image", "clierr", "is a folder: give an image file"], 1),
    ("image truncated", lambda e: _sample(e, "--image", e["cut_png"]),
     ["--image", "cut.png", "not a readable image"], 1),
    ("out under a file", lambda e: _sample(e)[:-1] + [e["root"] + "/a_file/o.mp4"],
     ["--out", "a_file", "is a file"], 1),
    ("out unwritable", lambda e: _sample(e)[:-1] + ["/proc/vdit-no/o.mp4"],
     ["--out", "/proc/vdit-no/o.mp4", "cannot write"], 1),
    ("video not a video", lambda e: _sample(e, "--video", e["root"] + "/fake.mp4"),
     ["--video", "fake.mp4", "cannot read video"], 1),
    ("binary prompt file", lambda e: ["sample", "--workdir", e["run"], "--prompt-file",
                                      e["root"] + "/prompts.bin"],
     ["--prompt-file", "prompts.bin", "not UTF-8"], 1),
    ("huge seed", lambda e: _sample(e, "--seed", str(2 ** 70)), ["--seed", "0..4294967295"], 1),
    ("seed wraps", lambda e: _sample(e, "--prompt", "a blue square", "--seed", str(2 ** 32 - 1)),
     ["--seed 4294967295 with 2 prompts", "give --seed <= 4294967294"], 1),
    ("zero-clip shards", lambda e: ["train", "--config", DIT, "--workdir", e["root"] + "/w3",
                                    *_tiny(e, e["empty"])], ["empty_shards", "hold no clips"], 1),
    ("mesh does not divide rows", lambda e: ["train", "--config", DIT, "--workdir",
                                             e["root"] + "/w4", *_tiny(e),
                                             "--config.data.rows_per_batch=4"],
     ["data.rows_per_batch", "= 4", "split 8 ways"], 1),
    ("vae_workdir is a DiT run", lambda e: ["encode", "--config", DIT, "--workdir",
                                            e["root"] + "/w5", *TINY,
                                            f"--config.encode.vae_workdir={e['run']}"],
     ["encode.vae_workdir", "is a DiT run", "a VAE run"], 1),
    ("sample on a VAE run", lambda e: ["sample", "--workdir", e["vae"], "--prompt", "x",
                                       "--out", e["root"] + "/out/v.mp4"],
     ["is a VAE run", "a DiT run", "is needed"], 1),
    ("lora rank 0 at start-up", lambda e: ["train", "--config", DIT, "--workdir", e["root"] + "/w6",
                                           "--config.lora.enabled=True", "--config.lora.rank=0"],
     ["lora.rank", "0", "positive"], 1),
    ("i2v_rate above 1", lambda e: ["train", "--config", DIT, "--workdir", e["root"] + "/w7",
                                    "--config.train.i2v_rate=1.5"], ["train.i2v_rate", "1.5"], 1),
    ("sample workdir missing", lambda e: _sample(e)[:1] + ["--workdir", e["root"] + "/nope",
                                                          "--prompt", "x"],
     ["--workdir", "nope", "does not exist"], 1),
]


@pytest.mark.parametrize("name,argv,words,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(env, capsys, name, argv, words, status):
    assert cli.main(argv(env)) == status
    err = capsys.readouterr().err.strip().splitlines()
    command = argv(env)[0]
    lines = [line for line in err if line.startswith(f"vdit {command}:")]
    assert len(lines) == 2, err  # the error, then where the traceback is
    assert lines[0].startswith(f"vdit {command}: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in "\n".join(err)


def test_nonfinite_abort_exits_3_with_step_and_no_checkpoint(env, capsys, tmp_path):
    """Default max_bad_steps (3): a run of NaN latents stops at step 3 with exit 3, saves nothing."""
    workdir = str(tmp_path / "nan")
    nan_dir = str(tmp_path / "nan_latents")
    test_train._write_shards(nan_dir, nan=True)
    argv = ["train", "--config", DIT, "--workdir", workdir, *_tiny(env, nan_dir)]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert "error: step 3: 3 consecutive steps with a non-finite loss" in err
    assert "no step had a finite loss" in err and "max_bad_steps=3" in err
    assert not any(n.isdigit() for n in os.listdir(os.path.join(workdir, "checkpoints")))
    assert os.path.isfile(os.path.join(workdir, "logs", "error.log"))


def test_debug_prints_the_traceback(env, capsys):
    argv = ["train", "--config", DIT, "--workdir", env["root"] + "/a_file", "--debug"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "is a file, not a folder" in err


def test_multihost_start_fails_in_bounded_time_naming_the_missing_process(tmp_path):
    cmd = [sys.executable, "-m", "vdit", "plan", "--config", DIT, "--coordinator",
           "127.0.0.1:18476", "--num_processes", "2", "--process_id", "0", "--init_timeout", "3"]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "process 1 of --num_processes=2 did not join" in result.stderr
    assert "--init_timeout=3 s" in result.stderr and "Check failure" not in result.stderr
