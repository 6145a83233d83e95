"""`vdit sample --mesh`: a Generator's weights sharded over a device mesh (8 fake CPU devices) sample
the same latents and write the same video as on one device (a sequence axis too; also when the
mesh spans two processes: only process 0 writes); the weights really are split, and so is a guided
batch of one's cond + uncond call over data; bad --mesh values fail naming the flag (a sequence
split that does not divide a video's tokens before the weights load)."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from generate_testing import t2v_pipeline

from vdit import cli, sample_cli
from vdit.data import video_io
from vdit.pipelines import sharded
from vdit.pipelines.generate import Generator

PROMPTS = ["a red circle moving right", "a blue square moving left"]
MESHES = ("fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=4", "sequence=2,fsdp=4")
CLIP = ["--frames", "5", "--size", "32x32", "--steps", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny Wan folder, its one-device Generator and reference latents (batch 2), and the
    Generator sharded over each mesh (built once, shared by the tests)."""
    folder = str(tmp_path_factory.mktemp("mesh") / "wan")
    t2v_pipeline(folder, with_text=True)
    gen = Generator.from_diffusers(folder)
    context, mask = gen.encode_text(PROMPTS)
    neg, neg_mask = gen.encode_text([""] * len(PROMPTS))
    noise = gen.noise(0, len(PROMPTS), 5, 32, 32)
    latents = gen.text_to_video(context, neg, noise, 2, 5.0, "latent", mask, neg_mask)
    on = {spec: sharded.on_mesh(gen, sharded.mesh_from_flag(spec)) for spec in MESHES}
    return dict(folder=folder, gen=gen, noise=noise, context=np.asarray(context),
                latents=np.asarray(latents), on=on)


@pytest.mark.parametrize("spec", MESHES)
def test_mesh_samples_the_single_device_latents(world, spec):
    gen = world["on"][spec]
    context, mask = gen.encode_text(PROMPTS)  # the sharded text encoder
    neg, neg_mask = gen.encode_text([""] * len(PROMPTS))
    np.testing.assert_allclose(np.asarray(context), world["context"], rtol=1e-5, atol=1e-6)
    latents = gen.text_to_video(context, neg, world["noise"], 2, 5.0, "latent", mask, neg_mask)
    assert latents.sharding.is_fully_replicated  # every process can read it
    np.testing.assert_allclose(np.asarray(latents), world["latents"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["fsdp=4,tensor=2", "sequence=8"])
def test_packed_text_path_samples_the_single_device_latents(world, spec):
    """vdit-trained runs sample through the DiT's packed call (`mask_text`: each prompt's real
    tokens only), with heads split over tensor or tokens over sequence (all-gathered keys: 2
    heads do not divide by 8)."""
    gen = dataclasses.replace(world["gen"], mask_text=True)
    context, mask = gen.encode_text(PROMPTS)
    neg, neg_mask = gen.encode_text([""] * len(PROMPTS))
    args = (context, neg, world["noise"], 2, 5.0, "latent", mask, neg_mask)
    want = np.asarray(gen.text_to_video(*args))
    got = sharded.on_mesh(gen, sharded.mesh_from_flag(spec)).text_to_video(*args)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)


def test_tokens_the_sequence_axis_does_not_divide_are_named(world):
    """9 frames at 32x32: 3x2x2 = 12 tokens a video, which sequence=8 does not split."""
    gen = sharded.on_mesh(world["gen"], sharded.mesh_from_flag("sequence=8"))
    noise = gen.noise(0, 1, 9, 32, 32)
    with pytest.raises(ValueError, match=r"--mesh sequence=8: a video here is 12 tokens \(3x2x2"):
        gen.text_to_video(world["context"][:1], None, noise, 2, 1.0, "latent")


def _fraction(array) -> float:
    return array.addressable_shards[0].data.size / array.size


@pytest.mark.parametrize("spec", ["fsdp=8", "fsdp=4,tensor=2"])
def test_weights_are_split_over_the_mesh(world, spec):
    """The big kernels (embed over fsdp, heads / mlp over tensor) hold 1/8 of themselves on a
    device; the VAE is whole on every device."""
    gen = world["on"][spec]
    blocks, text = gen.dit_params["blocks"], gen.text_params["layers"]
    for kernel in (blocks["ffn"]["linear_1"]["kernel"], blocks["attn1"]["to_q"]["kernel"],
                   blocks["attn2"]["to_out"]["kernel"], text["ffn"]["wi_0"]["kernel"],
                   text["attn"]["q"]["kernel"]):
        assert len(kernel.sharding.device_set) == 8
        assert _fraction(kernel) == 1 / 8, kernel.sharding
    largest = max(jax.tree.leaves(gen.dit_params), key=lambda x: x.size)
    assert _fraction(largest) <= 1 / 4, largest.sharding
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(gen.vae_params))


def test_batch_goes_over_data_when_it_divides(world):
    gen = world["on"]["data=2,fsdp=4"]
    assert gen.batch_axes(8) == ("data", "fsdp")
    assert gen.batch_axes(2) == ("data",)
    assert gen.batch_axes(1) == ()


def test_guidance_splits_a_batch_of_one_over_data(world, monkeypatch):
    """Batch 1 with guidance on data=2 x fsdp=4: its inputs (1 row) stay replicated, but inside the
    DiT the cond + uncond call's 2 rows go over data; the latents equal one device's."""
    one, gen = world["gen"], world["on"]["data=2,fsdp=4"]
    context, mask = one.encode_text(PROMPTS[:1])
    neg, neg_mask = one.encode_text([""])
    # guidance 4.0 (no other test's) so the sampling loop is traced afresh under the spy
    args = (context, neg, world["noise"][:1], 2, 4.0, "latent", mask, neg_mask)
    want = np.asarray(one.text_to_video(*args))
    assert gen.guided_rows(1, context, neg, 4.0, None) == 2
    assert gen.guided_rows(1, context, neg, 1.0, None) == 1  # guidance off: cond rows alone
    assert gen.guided_rows(1, context, None, 4.0, None) == 1
    seen, constrain = set(), nn.with_logical_constraint

    def spy(x, names, *rest, **kw):  # the mesh axes each batch-led activation is split over
        if names and names[0] == "activation_batch":
            axes = nn.logical_to_mesh_axes(names)[0]
            seen.add((x.shape[0], (axes,) if isinstance(axes, str) else tuple(axes or ())))
        return constrain(x, names, *rest, **kw)

    monkeypatch.setattr(nn, "with_logical_constraint", spy)
    got = gen.text_to_video(*args)
    monkeypatch.undo()
    assert seen == {(2, ("data",))}, seen
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _sample(folder, out, *extra):
    return cli.main(["sample", "--workdir", folder, "--prompt", PROMPTS[0], *CLIP,
                     "--out", str(out), *extra])


def test_cli_mesh_writes_the_same_video(world, tmp_path, capsys):
    assert _sample(world["folder"], tmp_path / "one.mp4") == 0
    assert _sample(world["folder"], tmp_path / "mesh.mp4", "--mesh", "fsdp=8") == 0
    assert "vdit sample: wrote" in capsys.readouterr().out
    one, _ = video_io.load_video(tmp_path / "one.mp4")
    mesh, _ = video_io.load_video(tmp_path / "mesh.mp4")
    assert one.shape == mesh.shape == (5, 32, 32, 3)
    diff = np.abs(one.astype(int) - mesh.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


@pytest.mark.parametrize("value, words", [
    ("bogus=2", "unknown axis 'bogus'"),
    ("fsdp", "AXIS=SIZE"),
    ("fsdp=two", "not a whole number"),
    ("fsdp=-1,tensor=-1", "only one axis may be -1"),
    ("fsdp=3", "8 devices"),
    ("fsdp=-1,tensor=3", "does not divide the 8 devices"),
    ("fsdp=2,tensor=4", "attention heads (num_attention_heads) is 2"),
])
def test_bad_mesh_fails_naming_the_flag(world, tmp_path, capsys, value, words):
    assert _sample(world["folder"], tmp_path / "x.mp4", "--mesh", value) != 0
    err = capsys.readouterr().err
    assert "--mesh" in err and words in err, err
    assert not (tmp_path / "x.mp4").exists()


def test_cli_refuses_a_sequence_split_before_loading(world, tmp_path, capsys, monkeypatch):
    """9 frames at 32x32 (3x2x2 = 12 tokens a video) on sequence=8: refused from the folder's
    config.json files, before any weights load."""
    def load(*args, **kwargs):
        raise AssertionError("the weights loaded")

    monkeypatch.setattr(sample_cli, "load_generator", load)
    assert _sample(world["folder"], tmp_path / "x.mp4", "--frames", "9", "--mesh",
                   "sequence=8") != 0
    err = capsys.readouterr().err
    assert "--mesh sequence=8: a video here is 12 tokens (3x2x2 patches" in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mesh_over_two_processes_writes_once(world, tmp_path):
    """`vdit sample --mesh data=2,fsdp=4` over 2 processes x 4 CPU devices (jax.distributed):
    process 0 alone writes the videos, the same as the one-device ones."""
    assert _sample(world["folder"], tmp_path / "one.mp4", "--prompt", PROMPTS[1]) == 0
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                         "--xla_backend_optimization_level=0")
    port, procs = _free_port(), []
    for i in range(2):
        out = tmp_path / f"p{i}" / "two.mp4"
        out.parent.mkdir()
        argv = ["sample", "--workdir", world["folder"], "--prompt", PROMPTS[0], "--prompt",
                PROMPTS[1], *CLIP, "--out", str(out), "--mesh", "data=2,fsdp=4",
                "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id",
                str(i), "--cpu_collectives", "gloo"]
        procs.append(subprocess.Popen([sys.executable, "-m", "vdit", *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "wrote" in logs[0] and "wrote" not in logs[1], logs
    assert not list((tmp_path / "p1").iterdir())
    for i in range(2):
        one, _ = video_io.load_video(tmp_path / f"one_{i:03d}.mp4")
        two, _ = video_io.load_video(tmp_path / "p0" / f"two_{i:03d}.mp4")
        assert np.abs(one.astype(int) - two.astype(int)).max() <= 2
