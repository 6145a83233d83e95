"""`vdit sample` (vdit/sample_cli.py) on a tiny diffusers pipeline folder with a text encoder:
numbered outputs, resized inputs, prompt expansion note, and clear errors."""

import os

import jax
import numpy as np
import pytest
from generate_testing import smooth_video, t2v_pipeline
from PIL import Image
from safetensors.numpy import save_file

from vdit.cli import build_parser
from vdit.config import ConfigError
from vdit.data import video_io
from vdit.sample_cli import output_paths, parse_lora, parse_size, run_cli

COMMON = ["--frames", "9", "--size", "32x32", "--steps", "4", "--guidance", "5"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wan_t2v"))
    t2v_pipeline(path, with_text=True)
    return path


def _args(*argv):
    return build_parser().parse_args(["sample", *argv])


def test_prompts_write_numbered_files(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square moving left\n\n")
    out = str(tmp_path / "clips" / "t2v.mp4")
    assert run_cli(_args("--workdir", folder, "--prompt", "a red circle moving right",
                         "--prompt-file", str(prompts), "--out", out, "--expand-prompt",
                         *COMMON)) == 0
    text = capsys.readouterr().out
    assert "only cleaned" in text and "expanded prompt: 'a red circle moving right'" in text
    for i in range(2):
        path = str(tmp_path / "clips" / f"t2v_{i:03d}.mp4")
        assert f"wrote {path}" in text
        video, fps = video_io.load_video(path)
        assert video.shape == (9, 32, 32, 3) and fps == 16.0


def test_video_and_image_inputs_are_fitted_with_a_message(folder, tmp_path, capsys):
    clip = (tmp_path / "in.mp4").as_posix()
    video_io.write_mp4(clip, smooth_video(1, frames=11, height=40, width=48)[0], fps=8)
    out = (tmp_path / "v2v.gif").as_posix()
    assert run_cli(_args("--workdir", folder, "--video", clip, "--strength", "0.5",
                         "--prompt", "red", "--prompt", "blue", "--out", out, *COMMON)) == 0
    text = capsys.readouterr().out
    assert "video " + clip + " is 40x48; resizing and center-cropping it to 32x32" in text
    assert os.path.isfile(out.replace(".gif", "_001.gif"))

    image = (tmp_path / "first.png").as_posix()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(image)
    out = (tmp_path / "i2v.mp4").as_posix()
    assert run_cli(_args("--workdir", folder, "--image", image, "--prompt", "red",
                         "--prompt", "blue", "--out", out, *COMMON)) == 0
    assert "is 20x30; resizing and center-cropping it to 32x32" in capsys.readouterr().out
    assert video_io.read_video(out.replace(".mp4", "_001.mp4")).shape == (9, 32, 32, 3)


def test_bad_requests_fail_clearly(folder, tmp_path):
    with pytest.raises(ConfigError, match="nearest valid: 9 or 13"):
        run_cli(_args("--workdir", folder, "--prompt", "x", "--frames", "10"))
    with pytest.raises(ValueError, match="give a prompt"):
        run_cli(_args("--workdir", folder))
    with pytest.raises(ValueError, match="unsupported suffix '.avi'"):
        run_cli(_args("--workdir", folder, "--prompt", "x", "--out", "a.avi"))
    with pytest.raises(ValueError, match="--size '32by32'"):
        parse_size("32by32")
    empty = tmp_path / "run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints/ folder: train first"):
        run_cli(_args("--workdir", str(empty), "--prompt", "x"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_cli(_args("--workdir", str(tmp_path / "nope"), "--prompt", "x"))
    with pytest.raises(ValueError, match="--size 40x32: height must be a positive multiple of "
                                         "16 .*nearest valid: 32x32 or 48x32"):
        run_cli(_args("--workdir", folder, "--prompt", "x", "--frames", "9", "--size", "40x32"))
    assert output_paths("o.mp4", 1) == ["o.mp4"]


def test_extend_and_upscale_modes(folder, tmp_path, capsys):
    """--mode (read when the parser defines it; set on the Namespace here)."""
    clip = (tmp_path / "in.mp4").as_posix()
    video_io.write_mp4(clip, smooth_video(1, frames=9, height=16, width=16)[0], fps=8)
    for mode, frames in (("upscale", 9), ("extend", 9 - 5 + 9)):
        out = (tmp_path / f"{mode}.mp4").as_posix()
        args = _args("--workdir", folder, "--video", clip, "--prompt", "red", "--prompt", "blue",
                     "--out", out, "--strength", "0.5", *COMMON)
        args.mode = mode
        assert run_cli(args) == 0
        video, fps = video_io.load_video(out.replace(".mp4", "_000.mp4"))
        assert video.shape == (frames, 32, 32, 3) and fps == 8.0
    args.mode = "rewind"
    with pytest.raises(ValueError, match="--mode 'rewind'"):
        run_cli(args)


def test_lora_flag_merges_and_errors_are_named(folder, tmp_path, capsys):
    """`--lora PATH:STRENGTH` changes the video (strength 0 leaves it as it was); a missing file,
    a bad strength and --lora-2 on a one-DiT model are named."""
    rng = np.random.default_rng(0)
    path = str(tmp_path / "style.safetensors")
    save_file({f"transformer.blocks.{i}.ffn.net.2.lora_{x}.weight":
               rng.normal(size=(24, 4) if x == "B" else (4, 32)).astype(np.float32)
               for i in (0, 1) for x in "AB"}, path)
    videos = {}
    for name, extra in (("plain", []), ("zero", ["--lora", f"{path}:0"]),
                        ("lora", ["--lora", f"{path}:1.5"])):
        out = str(tmp_path / f"{name}.mp4")
        assert run_cli(_args("--workdir", folder, "--prompt", "red", "--out", out, *extra,
                             *COMMON)) == 0
        videos[name] = video_io.read_video(out).astype(np.float32)
    assert f"merged LoRA {path} at strength 1.5" in capsys.readouterr().out
    np.testing.assert_array_equal(videos["zero"], videos["plain"])
    assert np.abs(videos["lora"] - videos["plain"]).mean() > 1.0
    assert parse_lora("gs://b/x.safetensors") == ("gs://b/x.safetensors", 1.0)
    assert parse_lora("x.safetensors:-0.5") == ("x.safetensors", -0.5)
    assert parse_lora("x.safetensors:1_0") == ("x.safetensors:1_0", 1.0)  # not a number: a path
    for bad in (":0.5", "x.safetensors:", "x.safetensors:inf"):
        with pytest.raises(ValueError, match="PATH or PATH:STRENGTH"):
            parse_lora(bad)
    with pytest.raises(ValueError, match="--weights params: .* a diffusers folder"):
        run_cli(_args("--workdir", folder, "--prompt", "x", "--weights", "params"))
    with pytest.raises(FileNotFoundError, match="--lora '.*none.safetensors' does not exist"):
        run_cli(_args("--workdir", folder, "--prompt", "x", "--lora",
                      str(tmp_path / "none.safetensors")))
    with pytest.raises(ValueError, match="one DiT"):
        run_cli(_args("--workdir", folder, "--prompt", "x", "--lora-2", path, *COMMON))


def test_out_of_memory_names_the_clip_and_what_to_shrink(folder, tmp_path, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED while sampling -> one line naming frames x height x width (the
    model's defaults when no flag gave them) and the flags that shrink it."""
    from vdit import cli, cli_errors
    from vdit.pipelines.generate import Generator
    from vdit.sample_cli import OutOfMemory

    def oom(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes")

    monkeypatch.setattr(Generator, "text_to_video", oom)
    out = str(tmp_path / "o.mp4")
    with pytest.raises(OutOfMemory) as e:
        run_cli(_args("--workdir", folder, "--prompt", "red", "--out", out))
    assert cli_errors.message(e.value) == (
        "out of device memory sampling 81x480x832 (frames x height x width): try a smaller "
        "--size or fewer --frames")
    with pytest.raises(OutOfMemory, match="2 videos of 9x32x32 .* or --batch-size 1"):
        run_cli(_args("--workdir", folder, "--prompt", "a", "--prompt", "b", "--out", out,
                      *COMMON))
    assert cli.main(["sample", "--workdir", folder, "--prompt", "red", "--out", out]) == 1


def test_upscale_and_extend_inputs_are_checked_before_sampling(folder, tmp_path, capsys):
    """--mode upscale fits another aspect (resize + center-crop, said), as the other modes do;
    extend's default context that --frames cannot hold names --context-frames and a valid value."""
    from vdit.sample_cli import SampleJob, load_generator

    gen, kind = load_generator(folder)
    clip = (tmp_path / "in.mp4").as_posix()
    video_io.write_mp4(clip, smooth_video(1, frames=9, height=16, width=24)[0], fps=8)
    args = _args("--workdir", folder, "--video", clip, "--prompt", "red", *COMMON)
    args.mode = "upscale"
    SampleJob(gen, kind, args)
    assert f"video {clip} is 16x24; resizing and center-cropping it to 32x32" in (
        capsys.readouterr().out)
    args = _args("--workdir", folder, "--video", clip, "--prompt", "red", "--frames", "5",
                 "--size", "32x32")
    args.mode = "extend"
    with pytest.raises(ValueError, match=r"--context-frames=5 \(the default\): .* use "
                                         r"--context-frames=1$"):
        SampleJob(gen, kind, args)


def test_vdit_adapter_file_and_folder_sample_as_its_diffusers_file(folder, tmp_path):
    """`--lora OUT/adapter.safetensors` (vdit's names, scaled by the adapter_config.json beside
    it, as `vdit export --adapter` writes them) and `--lora OUT` sample exactly as the diffusers
    file with the same factors (alpha / rank folded into lora_B)."""
    import json

    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 32, 4)).astype(np.float32)  # [layers, in, rank]
    b = rng.normal(size=(2, 4, 24)).astype(np.float32)  # [layers, rank, out]
    out_dir = tmp_path / "adapter"
    out_dir.mkdir()
    save_file({"blocks/ffn/linear_2/kernel/a": a, "blocks/ffn/linear_2/kernel/b": b},
              str(out_dir / "adapter.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(
        {"rank": 4, "alpha": 2.0, "diffusers": {"lora": "pytorch_lora_weights.safetensors"}}))
    save_file({f"transformer.blocks.{i}.ffn.net.2.lora_{x}.weight":
               np.ascontiguousarray(a[i].T if x == "A" else (b[i] * 0.5).T)
               for i in (0, 1) for x in "AB"}, str(out_dir / "pytorch_lora_weights.safetensors"))
    videos = []
    for lora in ("adapter.safetensors", "pytorch_lora_weights.safetensors", ""):
        out = str(tmp_path / f"{lora or 'folder'}.mp4")
        assert run_cli(_args("--workdir", folder, "--prompt", "red", "--out", out,
                             "--lora", str(out_dir / lora) + ":1.5", *COMMON)) == 0
        videos.append(video_io.read_video(out))
    np.testing.assert_array_equal(videos[0], videos[1])
    np.testing.assert_array_equal(videos[2], videos[1])
