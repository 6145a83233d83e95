"""Every command line quoted in README.md and launch/README.md runs: a walkthrough in the order the
READMEs give them, in one temporary folder, so a quoted command that stops working fails here.

How the commands run, and why:
* `vdit ...` lines run as written through `vdit.cli.main` in this process (same parser, same
  handlers, same exit code as the `vdit` script; one process shares JAX's compiled programs, which
  keeps the walkthrough to a few minutes on 2 cores). To make them tiny, the test *appends*
  `--config.KEY=VALUE` overrides, the documented way to change any recipe value (a later override
  wins): shrunken model, VAE and text widths, 2 train steps, 16 encoded clips (`TINY`). It never
  edits a quoted line. `vdit sample` lines get `--steps 2` appended the same way.
* `vdit train` with a Wan-size recipe runs in its `--dry-run` form (appended); the shapes recipes
  train for real (2 steps), since the lines after them sample, export and convert those runs.
* `launch/...` lines run in their `--dry-run` form (inserted after the script name) with fake
  gcloud/sbatch/srun on PATH that fail the test if called; the `vdit train` (or `encode`) config
  and overrides they would launch (after `--`) must load and hold every section it needs.
* `vdit eval shapes --workdir` samples 2 held-out prompts (`--samples 2`
  appended); `vdit serve` gets `--port 0` and returns once its model is loaded and its port bound.
* A quoted `$ vdit plan ...` transcript (the command, then its output in the same block) must be
  what the command prints now: each output line quoted appears in the output (up to a `...`
  elision), so a figure cannot go stale; README.md's prose figure for its plan line ("38.8 GiB
  per device") is that run's total.
* Inputs the READMEs assume a reader has are made first: a few short videos in `videos/`,
  `first.png`, a tiny random Wan2.1 pipeline folder at `weights/Wan2.1-T2V-1.3B-Diffusers`, and
  `demo_out/samples.jsonl` (what `make demo` writes; here it lists the walkthrough's own out.mp4).
"""

import json
import os
import re
import shlex
import shutil
import socketserver
import stat
import subprocess

import numpy as np
import pytest
from docs_testing import ROOT, commands, fenced_blocks
from generate_testing import t2v_pipeline

from vdit import cli
from vdit.config import load_config, require_sections
from vdit.data import video_io

SHAPES_TINY = [
    "--config.vae.base_dim=8", "--config.vae.num_res_blocks=0", "--config.train.progress=False",
    "--config.checkpoint.async_save=False"]
DIT_TINY = SHAPES_TINY + [
    "--config.model.num_layers=1", "--config.model.num_attention_heads=2",
    "--config.model.attention_head_dim=16", "--config.model.ffn_dim=32",
    "--config.model.freq_dim=16", "--config.model.text_dim=16", "--config.text.d_model=16",
    "--config.text.d_kv=8", "--config.text.d_ff=32", "--config.text.num_layers=1",
    "--config.text.num_heads=2", "--config.encode.num_examples=16", "--config.encode.num_shards=2",
    "--config.encode.batch_size=8", "--config.train.steps=2", "--config.checkpoint.every=2",
    "--config.train.tensorboard=False", "--config.data.rows_per_batch=8",
    "--config.data.prefetch=0"]
# `vdit distill` takes the model sizes from its (tiny) teacher run: only the schedule shrinks.
DISTILL_TINY = SHAPES_TINY + [
    "--config.train.steps=2", "--config.checkpoint.every=2", "--config.train.tensorboard=False",
    "--config.data.rows_per_batch=8", "--config.data.prefetch=0"]
TINY = {"shapes_vae": SHAPES_TINY + ["--config.vae_train.steps=2", "--config.vae_train.batch_size=2",
                                     "--config.vae_train.eval_examples=2",
                                     "--config.vae_train.shapes=[(1, 32, 32)]"]}
FAKE_TOOLS = ("gcloud", "sbatch", "srun", "scancel", "scontrol", "tail")


def _tiny(argv: list[str]) -> list[str]:
    """The overrides/flags appended to a quoted `vdit` command (see the module docstring)."""
    command = argv[0]
    if command == "sample":
        return ["--steps", "2"]
    if command == "eval":
        return ["--samples", "2"] if "--workdir" in argv else []
    if command == "serve":  # any free port; serve_forever returns at once (see the test)
        return ["--port", "0"]
    if "--config" not in argv:
        return []
    name = os.path.splitext(os.path.basename(argv[argv.index("--config") + 1]))[0]
    if name.startswith("shapes_") and command == "distill":
        return DISTILL_TINY
    if name.startswith("shapes_"):
        return TINY.get(name, DIT_TINY) if command in ("train-vae", "encode", "train") else []
    return ["--dry-run"] if command == "train" else []


def transcripts(path: str) -> dict[tuple, list[str]]:
    """{command words after `vdit`: the output lines quoted after it} for every fenced block that
    starts with `$ vdit ...` (continuation lines joined) and goes on with its output."""
    out = {}
    for block in fenced_blocks(path):
        if not block or not block[0].startswith("$ vdit "):
            continue
        end = 0
        while block[end].endswith("\\"):
            end += 1
        line = " ".join(b.strip().removesuffix("\\") for b in block[:end + 1])
        if block[end + 1:]:
            out[tuple(shlex.split(line.removeprefix("$ vdit "), comments=True))] = block[end + 1:]
    return out


def check_transcript(expected: list[str], printed: str, command: str) -> None:
    """Each quoted output line is in what the command printed (a `...` elides the rest)."""
    lines = printed.splitlines()
    for line in expected:
        head = line.split("...")[0].rstrip() if "..." in line else line
        assert any(p.startswith(head) if "..." in line else p == line for p in lines), (
            f"`{command}`: the quoted line {line!r} is not what it prints now:\n{printed}")


def check_plan_prose(readme: str, printed: str) -> None:
    """README.md's "(...): N GiB per device" after its plan line is the printed total."""
    with open(readme) as f:
        quoted = re.search(r"\): ([\d.]+) GiB per\s+device", f.read())
    total = re.search(r"^\s+total\s+([\d.]+) GiB$", printed, re.M)
    assert quoted and total, printed
    decimals = len(quoted.group(1).partition(".")[2])
    assert f"{float(total.group(1)):.{decimals}f}" == quoted.group(1), (
        f"README.md says {quoted.group(1)} GiB per device; the plan line prints {total.group(1)}")


def _inputs(root) -> None:
    videos = root / "videos"
    videos.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red circle moving right", "a blue square"]):
        base = rng.integers(0, 255, size=(1, 32, 48, 3)).astype(np.float32)
        clip = np.clip(base + np.linspace(0, 60, 12)[:, None, None, None], 0, 255)
        video_io.write_mp4(videos / f"clip{i}.mp4", clip.astype(np.uint8), fps=8.0)
        (videos / f"clip{i}.txt").write_text(caption + "\n")
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:20, 8:20] = (220, 40, 40)
    video_io.write_video(root / "first.gif", image[None], fps=8.0)
    shutil.copy(root / "first.gif", root / "first.png")  # PIL reads by content, not by suffix
    t2v_pipeline(str(root / "weights" / "Wan2.1-T2V-1.3B-Diffusers"), with_text=True)
    (root / "demo_out").mkdir()
    (root / "demo_out" / "samples.jsonl").write_text(json.dumps(
        {"file": "../out.mp4", "prompt": "a red circle moving right", "color": "red",
         "shape": "circle", "direction": "right"}) + "\n")


def _launch_env(tmp_path) -> dict:
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for tool in FAKE_TOOLS:
        path = fake / tool
        path.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {tmp_path}/called\nexit 1\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "SLURM_"))}
    env["PATH"] = f"{fake}:{env['PATH']}"
    return env


def _run_launch(words: list[str], env: dict) -> None:
    script, rest = words[0], words[1:]
    argv = rest if "--dry-run" in rest else ["--dry-run", *rest]
    proc = subprocess.run(["bash", os.path.join(ROOT, script), *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(words)}\n{proc.stdout}{proc.stderr}"
    if "--config" in rest:  # the vdit train/encode it launches: recipe and overrides must hold
        overrides = rest[rest.index("--") + 1:] if "--" in rest else []
        config = load_config(os.path.join(ROOT, rest[rest.index("--config") + 1]), overrides)
        command = next((w for w in rest if w in ("encode", "curate")), "train")
        require_sections(config, command, words[0])


@pytest.mark.slow
@pytest.mark.parametrize("readme", ["README.md", "launch/README.md"])
def test_readme_commands_run(readme, tmp_path, monkeypatch, capsys):
    quoted = commands(os.path.join(ROOT, readme))
    assert len(quoted) >= 8
    outputs = transcripts(os.path.join(ROOT, readme))
    for name in ("configs", "launch"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    # `vdit serve` loads its model and binds its port for real, then returns instead of serving
    # until Ctrl-C (tests/test_serve.py drives the page in a browser).
    monkeypatch.setattr(socketserver.BaseServer, "serve_forever", lambda self, *a, **k: None)
    env = _launch_env(tmp_path)
    for words in quoted:
        if words[0] == "export":
            env.update(dict(w.split("=", 1) for w in words[1:]))
        elif words[0].startswith("launch/"):
            _run_launch(words, env)
        else:
            argv = words[1:] + _tiny(words[1:])
            capsys.readouterr()
            code = cli.main(argv)
            printed = capsys.readouterr()
            assert code == 0, f"`{' '.join(words)}` exited {code}:\n{printed.err}"
            if tuple(words[1:]) in outputs:
                check_transcript(outputs[tuple(words[1:])], printed.out, " ".join(words))
            if readme == "README.md" and words[1] == "plan":
                check_plan_prose(os.path.join(ROOT, readme), printed.out)
    assert not (tmp_path / "called").exists(), (tmp_path / "called").read_text()
