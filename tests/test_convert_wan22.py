"""`vdit convert` on every Wan2.2 pipeline layout: two-expert A14B (T2V, I2V: transformer_2/ and
boundary_ratio) and TI2V (the 2.2 VAE, expand_timesteps). The run samples exactly as the folder
does and converts back tensor for tensor, with the folder's model_index.json options."""

import json
import os

import jax
import numpy as np
import pytest
from generate_testing import a14b_pipeline, add_text_encoder, text_embeddings, ti2v_i2v_pipeline

from vdit import cli
from vdit.convert.safetensors_io import read_tensors
from vdit.pipelines.generate import Generator
from vdit.train.init_from import run_weights

LAYOUTS = {
    "a14b_t2v": (lambda d: a14b_pipeline(d), ("transformer", "transformer_2", "vae")),
    "a14b_i2v": (lambda d: a14b_pipeline(d, i2v=True), ("transformer", "transformer_2", "vae")),
    "ti2v_i2v": (ti2v_i2v_pipeline, ("transformer", "vae")),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_wan22_folder_converts_both_ways(layout, tmp_path):
    build, components = LAYOUTS[layout]
    src, run, back = (str(tmp_path / n) for n in ("src", "run", "back"))
    build(src)
    add_text_encoder(src)
    assert cli.main(["convert", "--from", "diffusers", "--src", src, "--out", run]) == 0
    ours, ref = Generator.from_workdir(run), Generator.from_diffusers(src)
    assert (ours.dit_2 is None) == (ref.dit_2 is None) and ours.boundary == ref.boundary
    assert ours.expand_timesteps == ref.expand_timesteps
    if ref.dit_2 is not None:
        weights, _ = run_weights(run, "ema")
        jax.tree.map(np.testing.assert_array_equal, weights["dit_2"],
                     jax.device_get(ref.dit_2_params))
    ctx, neg = text_embeddings(1)
    f = ref.vae.spatial_factor
    noise = np.random.default_rng(1).normal(size=(1, 2, 4, 4, ref.vae.z_dim)).astype(np.float32)
    first = np.random.default_rng(2).uniform(-1, 1, (1, 4 * f, 4 * f, 3)).astype(np.float32)
    kw = dict(steps=3, guidance=3.0, output="latent")
    if ref.dit_2 is not None:
        kw["guidance_2"] = 2.0
    run_both = (lambda g: g.text_to_video(ctx, neg, noise, **kw)) if layout == "a14b_t2v" else (
        lambda g: g.image_to_video(first, ctx, neg, noise, **kw))
    np.testing.assert_array_equal(np.asarray(run_both(ours)), np.asarray(run_both(ref)))

    assert cli.main(["convert", "--to", "diffusers", "--src", run, "--out", back]) == 0
    load = lambda d: json.load(open(os.path.join(d, "model_index.json")))
    keys = ("_class_name", "boundary_ratio", "expand_timesteps")
    assert {k: load(back).get(k) for k in keys} == {k: load(src).get(k) or None for k in keys}
    for name in components:
        want, got = (read_tensors(os.path.join(d, name)) for d in (src, back))
        assert sorted(got) == sorted(want), name
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
