"""`vdit convert --to diffusers` keeps what a vdit run does (vdit/convert/run_record.py): a shapes
run with Wan2.1 I2V input channels that trains text-to-video, on packed captions (text masked),
written as a pipeline folder, samples from the folder as the run itself does: text-to-video
allowed, the same masking, the run's sampling defaults, the same latents."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from generate_testing import t2v_pipeline
from train_testing import VIDEOS, tiny_config, train_tiny, write_shards

from vdit import cli
from vdit.convert import diffusers_folder, run_record
from vdit.models.vae_config import vae_from_config
from vdit.pipelines.generate import Generator
from vdit.runs import checkpoint
from vdit.sample_cli import load_generator

# float32 matmuls (the recipe's are bfloat16): the folder's DiT computes in float32, so the two
# agree to float32 rounding
OVERRIDES = ["--config.vae.base_dim=8", "--config.vae.num_res_blocks=0",
             "--config.model.matmul_dtype=float32"]


@pytest.fixture(scope="module")
def run_and_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    latents = write_shards(str(root / "latents"), VIDEOS)
    with open(os.path.join(latents, "stats.json"), "w") as f:
        json.dump({"mean": [0.1 * i for i in range(8)], "std": [1.0 + 0.1 * i for i in range(8)]},
                  f)
    vae_dir, run, out = (str(root / n) for n in ("vae", "run", "out"))
    config = tiny_config("shapes_dit", latents, *OVERRIDES)
    vae = vae_from_config(config.vae)
    shapes = jax.eval_shape(lambda: meta.unbox(vae.init(jax.random.key(0),
                                                        jnp.zeros((1, 1, 4, 4, 3))))["params"])
    rng = np.random.default_rng(0)
    vae_params = jax.tree.map(lambda s: 0.1 * rng.normal(size=s.shape).astype(np.float32), shapes)
    manager = checkpoint.make_manager(vae_dir, config.checkpoint, with_data=False)
    checkpoint.save(manager, 1, {"ema": vae_params}, config)
    manager.wait_until_finished()
    # i2v_rate 0: I2V input channels, trained text-to-video only (each clip a zero condition)
    train_tiny("shapes_dit", run, latents, 2, *OVERRIDES, "--config.train.i2v_rate=0.0",
               f"--config.encode.vae_workdir={vae_dir}")
    return run, out


def test_folder_samples_as_the_run(run_and_folder, capsys):
    run, out = run_and_folder
    assert cli.main(["convert", "--to", "diffusers", "--src", run, "--out", out]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "zero-padded" in err
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "WanImageToVideoPipeline"  # what diffusers needs to load it
    ours = Generator.from_workdir(run)
    assert ours.mask_text and not ours.image_only
    assert index[run_record.KEY] == {"image_only": False, "mask_text": True,
                                     "defaults": ours.defaults}
    for folder, _ in (Generator.from_diffusers(out), None), load_generator(out):
        assert (folder.image_only, folder.mask_text) == (False, True)
        assert folder.defaults == diffusers_folder.WAN_DEFAULTS | ours.defaults
        assert folder.defaults["steps"] == ours.defaults["steps"] != 50

    folder = Generator.from_diffusers(out)
    ctx, mask = ours.encode_text(["a red circle moving left"])
    neg, neg_mask = ours.encode_text([""])
    noise = ours.noise(0, 1, 5, 16, 16)
    kw = dict(steps=3, guidance=3.0, output="latent", context_mask=mask, negative_mask=neg_mask)
    want = np.asarray(ours.text_to_video(ctx, neg, noise, **kw))
    got = np.asarray(folder.text_to_video(ctx, neg, noise, **kw))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-5, err


def test_folder_record_is_checked(run_and_folder, tmp_path):
    run, out = run_and_folder
    if not os.path.exists(out):
        assert cli.main(["convert", "--to", "diffusers", "--src", run, "--out", out]) == 0
    bad = str(tmp_path / "bad")
    shutil.copytree(out, bad)
    with open(os.path.join(bad, "model_index.json")) as f:
        index = json.load(f)
    index[run_record.KEY]["mask_text"] = "yes"
    with open(os.path.join(bad, "model_index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=r"_vdit\.mask_text='yes'; expected true or false"):
        Generator.from_diffusers(bad)


def test_published_folders_keep_wan_behaviour(tmp_path):
    """No "_vdit" key: Wan's defaults, the padded prompt attended, I2V folders image-only."""
    src = str(tmp_path / "src")
    t2v_pipeline(src)
    gen = Generator.from_diffusers(src)
    assert gen.defaults == diffusers_folder.WAN_DEFAULTS
    assert not gen.mask_text and not gen.image_only
    assert diffusers_folder.is_image_only("WanImageToVideoPipeline", False)
    assert not diffusers_folder.is_image_only("WanImageToVideoPipeline", False, recorded=False)
