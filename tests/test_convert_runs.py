"""`vdit convert` (vdit/convert/runs.py): a diffusers Wan pipeline folder becomes vdit runs that
sample exactly as the folder does, converts back tensor for tensor, and a trained shapes run
becomes a pipeline folder with the run's weights and latent statistics."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from generate_testing import add_text_encoder, i2v_pipeline, t2v_pipeline, text_embeddings
from train_testing import VIDEOS, tiny_config, train_tiny, write_shards

from vdit import cli
from vdit.convert import wan
from vdit.convert.safetensors_io import read_config, read_tensors
from vdit.models.vae_config import vae_from_config
from vdit.pipelines.generate import Generator
from vdit.runs import checkpoint
from vdit.sample_cli import load_generator
from vdit.train.init_from import run_weights

COMPONENTS = ("transformer", "vae", "text_encoder")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    src, run = str(root / "src"), str(root / "run")
    t2v_pipeline(src, with_text=True)
    assert cli.main(["convert", "--from", "diffusers", "--src", src, "--out", run]) == 0
    return src, run


def test_converted_run_samples_like_the_pipeline(converted):
    src, run = converted
    ours, ref = Generator.from_workdir(run), Generator.from_diffusers(src)
    weights, _ = run_weights(run, "ema")
    jax.tree.map(np.testing.assert_array_equal, weights["dit"], jax.device_get(ref.dit_params))
    kw = dict(frames=5, height=16, width=16, seed=3, steps=3, guidance=4.0)
    a = np.asarray(ours.generate(["a red circle moving left"], **kw))
    b = np.asarray(ref.generate(["a red circle moving left"], **kw))
    np.testing.assert_array_equal(a, b)
    vae_params, saved = checkpoint.load_params(os.path.join(run, "vae"))
    assert saved["vae"]["z_dim"] == ref.vae.z_dim
    jax.tree.map(np.testing.assert_array_equal, vae_params, jax.device_get(ref.vae_params))
    # The run stands alone (copied to a bucket, its source folder gone): its own tokenizer.
    tokenizer = checkpoint.read_config(run)["text"]["tokenizer_path"]
    assert tokenizer == os.path.join(run, "tokenizer")
    assert sorted(os.listdir(tokenizer)) == sorted(os.listdir(os.path.join(src, "tokenizer")))


def test_bfloat16_weights_sample_close_to_float32(converted):
    """`vdit sample --dtype bfloat16`: the DiT's and text encoder's weights held (half the memory:
    what a 14B model needs on one 80 GB card) and run in bfloat16 but for those the reference
    keeps in float32, the VAE in float32, for a diffusers folder and its converted run alike."""
    src, run = converted
    kw = dict(frames=5, height=16, width=16, seed=3, steps=3, guidance=4.0)
    want = np.asarray(Generator.from_diffusers(src).generate(["a red circle moving left"], **kw))
    for path in (src, run):
        gen, _ = load_generator(path, dtype="bfloat16")
        # what diffusers' / transformers' _keep_in_fp32_modules keep: the time embedder, the
        # modulation tables and the norms of the DiT, UMT5's FFN output
        kept = lambda where: {getattr(k, "key", None) for k in where} & {
            "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "wo"}
        dtypes = {}
        for tree in (gen.dit_params, gen.text_params):
            for where, x in jax.tree_util.tree_leaves_with_path(tree):
                dtypes.setdefault(bool(kept(where)), set()).add(x.dtype)
        assert dtypes == {True: {jnp.dtype(jnp.float32)}, False: {jnp.dtype(jnp.bfloat16)}}
        assert {x.dtype for x in jax.tree.leaves(gen.vae_params)} == {jnp.dtype(jnp.float32)}
        got = np.asarray(gen.generate(["a red circle moving left"], **kw))
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        print(f"{path}: bfloat16 against float32, relative error {err:.2e}")
        assert 0 < err < 0.1, err


def test_round_trip_is_tensor_for_tensor(converted, tmp_path):
    src, run = converted
    back = str(tmp_path / "back")
    assert cli.main(["convert", "--to", "diffusers", "--src", run, "--out", back]) == 0
    for name in COMPONENTS:
        want, got = read_tensors(os.path.join(src, name)), read_tensors(os.path.join(back, name))
        assert sorted(got) == sorted(want), name
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
    assert read_config(os.path.join(back, "vae"))["latents_mean"] == pytest.approx(
        read_config(os.path.join(src, "vae"))["latents_mean"])
    with open(os.path.join(src, "scheduler", "scheduler_config.json")) as f:
        scheduler = json.load(f)
    with open(os.path.join(back, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f) == scheduler
    assert sorted(os.listdir(os.path.join(back, "tokenizer"))) == sorted(
        os.listdir(os.path.join(src, "tokenizer")))


def test_shapes_run_to_diffusers(tmp_path):
    """A trained byte-text shapes run: its EMA DiT, its VAE with the shards' statistics, no
    text encoder (byte ids have no transformers tokenizer); the folder loads as a pipeline."""
    latents = write_shards(str(tmp_path / "latents"), VIDEOS)
    stats = {"mean": [0.1 * i for i in range(8)], "std": [1.0 + 0.1 * i for i in range(8)]}
    with open(os.path.join(latents, "stats.json"), "w") as f:
        json.dump(stats, f)
    vae_dir, run, out = (str(tmp_path / n) for n in ("vae", "run", "out"))
    vae_overrides = ["--config.vae.base_dim=8", "--config.vae.num_res_blocks=0"]
    config = tiny_config("shapes_dit", latents, *vae_overrides)
    vae = vae_from_config(config.vae)
    shapes = jax.eval_shape(lambda: meta.unbox(vae.init(jax.random.key(0),
                                                        jnp.zeros((1, 1, 4, 4, 3))))["params"])
    rng = np.random.default_rng(0)
    vae_params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    manager = checkpoint.make_manager(vae_dir, config.checkpoint, with_data=False)
    checkpoint.save(manager, 1, {"ema": vae_params}, config)
    manager.wait_until_finished()
    train_tiny("shapes_dit", run, latents, 2, *vae_overrides, "--config.train.i2v_rate=0.0",
               f"--config.encode.vae_workdir={vae_dir}")

    assert cli.main(["convert", "--to", "diffusers", "--src", run, "--out", out]) == 0
    assert not os.path.exists(os.path.join(out, "text_encoder"))
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "WanImageToVideoPipeline"  # the recipe's I2V input layout
    assert index["text_encoder"] == [None, None]
    dit, dit_params = wan.load_transformer(os.path.join(out, "transformer"))
    weights, _ = run_weights(run, "ema")
    jax.tree.map(np.testing.assert_array_equal, dit_params, weights["dit"])
    assert dit.in_channels == config.model.in_channels
    vae_cfg = read_config(os.path.join(out, "vae"))
    assert vae_cfg["latents_mean"] == pytest.approx(stats["mean"])
    assert vae_cfg["latents_std"] == pytest.approx(stats["std"])
    gen = Generator.from_diffusers(out)
    np.testing.assert_allclose(gen.latents_mean, stats["mean"], rtol=1e-6)


def test_convert_errors_name_the_problem(converted, tmp_path, capsys):
    src, run = converted
    assert cli.main(["convert", "--from", "diffusers", "--src", src, "--out", run]) == 1
    assert "not empty" in capsys.readouterr().err
    no_text = str(tmp_path / "no_text")
    t2v_pipeline(no_text)
    assert cli.main(["convert", "--from", "diffusers", "--src", no_text,
                     "--out", str(tmp_path / "x")]) == 1
    assert "no text_encoder/ folder" in capsys.readouterr().err
    assert cli.main(["convert", "--from", "vdit", "--to", "vdit", "--src", run,
                     "--out", str(tmp_path / "y")]) == 1
    assert "diffusers -> vdit or vdit -> diffusers" in capsys.readouterr().err
    assert cli.main(["convert", "--from", "diffusers", "--src", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "z")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_i2v_pipeline_converts_both_ways(tmp_path):
    """Wan2.1 I2V: the run keeps the CLIP image encoder and processor, samples image-to-video as
    the folder does, and `--to diffusers` writes an I2V folder tensor for tensor."""
    src, run, back = (str(tmp_path / n) for n in ("src", "run", "back"))
    i2v_pipeline(src)
    add_text_encoder(src)
    assert cli.main(["convert", "--from", "diffusers", "--src", src, "--out", run]) == 0
    _, saved = run_weights(run, "ema")
    assert saved["image_encoder"]["image_encoder_path"] == os.path.join(run, "image_encoder")
    ours, ref = Generator.from_workdir(run), Generator.from_diffusers(src)
    assert ours.dit.has_image_branch and ours.image_processor == ref.image_processor
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ours.image_encoder_params),
                 jax.device_get(ref.image_encoder_params))
    ctx, neg = text_embeddings(1)
    noise = np.random.default_rng(1).normal(size=(1, 2, 4, 4, ref.vae.z_dim)).astype(np.float32)
    first = np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    kw = dict(steps=2, guidance=3.0, output="latent")
    np.testing.assert_array_equal(np.asarray(ours.image_to_video(first, ctx, neg, noise, **kw)),
                                  np.asarray(ref.image_to_video(first, ctx, neg, noise, **kw)))

    assert cli.main(["convert", "--to", "diffusers", "--src", run, "--out", back]) == 0
    with open(os.path.join(back, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["image_encoder"][0] == "transformers" and index["image_processor"][0]
    want, got = (read_tensors(os.path.join(d, "transformer")) for d in (src, back))
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # transformers 5 saves CLIP keys without the `vision_model.` prefix Wan's folders carry:
    # compare what both load to
    (_, want), (_, got) = (wan.load_image_encoder(os.path.join(d, "image_encoder"))
                           for d in (src, back))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    processor = lambda d: json.load(open(os.path.join(d, "image_processor",
                                                      "preprocessor_config.json")))
    assert processor(back) == processor(src)
    assert Generator.from_diffusers(back).image_encoder is not None
