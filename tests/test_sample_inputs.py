"""`vdit sample`'s inputs: what is checked before the model loads, and what is said when an input
is used in part (vdit/sample_cli.py), and the Python API's keyframe arguments (generate.py)."""

import os

import numpy as np
import pytest
from generate_testing import i2v_pipeline, smooth_video, t2v_pipeline, text_embeddings
from train_testing import TINY

from vdit import sample_cli
from vdit.cli import build_parser
from vdit.config import load_config
from vdit.pipelines.generate import Generator
from vdit.runs import checkpoint
from vdit.sample_cli import run_cli, trim_frames


def test_a_video_cut_to_1_plus_4k_frames_says_so(capsys):
    video = np.zeros((10, 4, 4, 3), np.uint8)
    assert trim_frames(video, None, "in.mp4").shape[0] == 9
    assert capsys.readouterr().out.strip() == (
        "vdit sample: --video in.mp4 has 10 frames; using the first 9 (a clip is 1+4k frames; "
        "--frames chooses)")
    assert trim_frames(video[:3], None, "in.mp4").shape[0] == 1
    assert "has 3 frames; using the first 1" in capsys.readouterr().out
    # nothing dropped, or the user chose: nothing to say
    trim_frames(video[:9], None, "in.mp4")
    trim_frames(video, 5, "in.mp4")
    assert capsys.readouterr().out == ""


def test_size_is_checked_against_the_run_before_its_weights_load(tmp_path, monkeypatch):
    # A run's checkpoint holding only its config: the check reads nothing else.
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                       "shapes_dit.py"), TINY)
    run = str(tmp_path / "run")
    manager = checkpoint.make_manager(run, config.checkpoint, with_data=False)
    checkpoint.save(manager, 1, {"ema": {"dit": np.zeros(1, np.float32)}}, config)
    manager.wait_until_finished()

    def no_load(*_, **__):
        raise AssertionError("the model loaded before --size was checked")
    monkeypatch.setattr(sample_cli, "load_generator", no_load)
    args = build_parser().parse_args(["sample", "--workdir", run, "--prompt", "x",
                                      "--size", "36x36", "--out", str(tmp_path / "o.mp4")])
    with pytest.raises(ValueError, match=r"^--size 36x36: height must be a positive multiple of "
                                         r"8 and width of 8 .*nearest valid: 32x32 or 40x40$"):
        run_cli(args)
    args.size = "32x40"
    with pytest.raises(AssertionError, match="the model loaded"):  # valid: on to the load
        run_cli(args)


def test_last_image_with_a_one_frame_noise_is_refused(tmp_path):
    # both images would be frame 0: one was dropped (pinning) or overwrote the other (I2V channels)
    ctx, neg = text_embeddings(1)
    first, last = smooth_video(1, seed=2)[:, 0], smooth_video(1, seed=3)[:, 0]
    for make in (t2v_pipeline, i2v_pipeline):
        folder = str(tmp_path / make.__name__)
        make(folder)
        gen = Generator.from_diffusers(folder)
        noise = gen.noise(0, 1, 1, 32, 32)
        with pytest.raises(ValueError, match="last_image with a 1-frame noise"):
            gen.image_to_video(first, ctx, neg, noise, 2, 5.0, "latent", last_image=last)
