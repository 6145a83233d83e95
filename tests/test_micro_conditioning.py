"""Micro-conditioning on fps and motion: zero-initialised (a no-op until trained), then effective;
packed equals dense; per-segment values packed from record meta; Generator / CLI plumbing and
errors for models without it."""

import argparse
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dit_testing import pack_row, tiny_model_config
from generate_testing import t2v_pipeline, text_embeddings

from vdit.config import recipe_module
from vdit.data import pipeline
from vdit.data.synthetic import SyntheticShapes
from vdit.models import patches
from vdit.models.dit import build_dit
from vdit.pipelines.generate import Generator
from vdit.sample_cli import SampleJob

PATCH = (1, 2, 2)
NAMES = ("fps", "motion")


def _init(model):
    x = jnp.zeros((1, 1, 2, 2, 4))
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), x, jnp.zeros(1),
                                        jnp.zeros((1, 3, 16)))["params"])


def _perturbed(params, seed=1):
    """The zero-initialised last layers set to random values (as training would move them)."""
    params = dict(params)
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    for name in NAMES:
        layer = dict(params["micro_embedder"][name])
        for k in ("kernel_2", "bias_2"):
            layer[k] = 0.3 * jax.random.normal(next(keys), layer[k].shape)
        params["micro_embedder"] = dict(params["micro_embedder"]) | {name: layer}
    return params


@pytest.fixture(scope="module")
def models():
    plain = build_dit(tiny_model_config())
    micro = build_dit(tiny_model_config(micro_conditioning=list(NAMES)))
    return plain, micro, _init(micro)


def _inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 2, 4, 4, 4)).astype(np.float32)
    ctx = rng.normal(size=(batch, 3, 16)).astype(np.float32)
    return x, np.array([100.0, 700.0][:batch], np.float32), ctx


def test_zero_init_is_the_plain_model_then_values_matter(models):
    plain, micro, params = models
    base = {k: v for k, v in params.items() if k != "micro_embedder"}
    plain_shapes = jax.eval_shape(lambda: _init(plain))
    assert jax.tree.structure(plain_shapes) == jax.tree.structure(base)  # same tree as before
    assert sorted(params["micro_embedder"]) == ["fps", "motion"]
    x, t, ctx = _inputs()
    ref = plain.apply({"params": base}, x, t, ctx)
    values = {"fps": jnp.array([8.0, 24.0]), "motion": jnp.array([0.1, 0.4])}
    out = micro.apply({"params": params}, x, t, ctx, micro=values)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))

    moved = _perturbed(params)
    a = np.asarray(micro.apply({"params": moved}, x, t, ctx, micro=values))
    for name in NAMES:
        other = dict(values) | {name: values[name] + 0.5}
        b = np.asarray(micro.apply({"params": moved}, x, t, ctx, micro=other))
        assert np.abs(a - b).max() > 1e-3, name
    assert np.abs(a - np.asarray(ref)).max() > 1e-3


def test_packed_equals_dense_per_segment(models):
    _, micro, params = models
    params = _perturbed(params)
    rng = np.random.default_rng(3)
    videos = [rng.normal(size=s).astype(np.float32) for s in ((2, 4, 4, 4), (1, 2, 6, 4))]
    texts = [rng.normal(size=(n, 16)).astype(np.float32) for n in (3, 2)]
    ts = np.array([150.0, 820.0, 0.0], np.float32)
    fps, motion = np.array([8.0, 30.0, 0.0], np.float32), np.array([0.05, 0.6, 0.0], np.float32)
    row = pack_row(videos, texts, ts, PATCH, seq_len=24, text_len=8)
    tokens, pos, seg, t, ctx, ctx_seg, slices = row
    packed = jax.jit(lambda *a, **kw: micro.apply({"params": params}, *a, **kw, method="packed"))
    apply = jax.jit(lambda *a, **kw: micro.apply({"params": params}, *a, **kw))
    out = packed(tokens[None], pos[None], seg[None], t[None], ctx[None], ctx_seg[None],
                 micro={"fps": fps[None], "motion": motion[None]})[0]
    for k, video in enumerate(videos):
        dense = apply(video[None], ts[k:k + 1], texts[k][None],
                      micro={"fps": fps[k:k + 1], "motion": motion[k:k + 1]})
        np.testing.assert_allclose(np.asarray(out[slices[k]]),
                                   patches.patchify(np.asarray(dense[0]), PATCH)[0],
                                   atol=1e-5, rtol=1e-5)


def test_model_errors(models):
    plain, micro, params = models
    x, t, ctx = _inputs(batch=1)
    with pytest.raises(ValueError, match=r"micro-conditioned on \['fps', 'motion'\].*got values for \[\]"):
        micro.apply({"params": params}, x, t, ctx)
    with pytest.raises(ValueError, match="expected \\(1,\\)"):
        micro.apply({"params": params}, x, t, ctx, micro={"fps": jnp.ones(2), "motion": jnp.ones(2)})
    base = {k: v for k, v in params.items() if k != "micro_embedder"}
    with pytest.raises(ValueError, match="micro_conditioning is empty"):
        plain.apply({"params": base}, x, t, ctx, micro={"fps": jnp.ones(1)})
    with pytest.raises(ValueError, match=r"config.model.micro_conditioning.*unknown: \['speed'\]"):
        build_dit(tiny_model_config(micro_conditioning=["fps", "speed"]))
    with pytest.raises(ValueError, match="distinct"):
        build_dit(tiny_model_config(micro_conditioning=["fps", "fps"]))


def test_pipeline_packs_fps_and_motion_per_segment():
    data = SyntheticShapes(frames=5, height=16, width=16, fps=12.0, speed_range=(0.1, 0.5))
    records = []
    for i in range(8):
        clip = data.render(i)
        assert clip["motion"] == data.motion(i) and clip["motion"] >= 0.0
        latents = np.full((1 + (i % 2), 2, 2, 4), float(i), np.float32)  # value = record index
        records.append({"latents": latents, "text": np.arange(2, dtype=np.int32), "caption": "x",
                        "meta": {"fps": clip["fps"] + i, "motion": clip["motion"]}})
    cfg = recipe_module("common").packing()
    cfg.update(dict(tokens_per_row=6, text_per_row=8, rows_per_batch=2, max_segments=3,
                    prefetch=0, caption_dropout=0.0))
    it = iter(pipeline.packed_dataset(records, cfg, PATCH, np.zeros(1, np.int32), 0, 1,
                                      micro=NAMES))
    for _ in range(3):
        batch = next(it)
        assert batch["micro_fps"].shape == batch["micro_motion"].shape == (2, 3)
        for r in range(2):
            for k in range(1, 4):
                sel = batch["segment_ids"][r] == k
                if not sel.any():
                    assert batch["micro_fps"][r, k - 1] == 0.0
                    continue
                i = int(batch["tokens"][r][sel][0, 0])
                assert batch["micro_fps"][r, k - 1] == 12.0 + i
                assert batch["micro_motion"][r, k - 1] == np.float32(records[i]["meta"]["motion"])
    with pytest.raises(ValueError, match="meta has no 'motion'"):
        pipeline.clip_tokens({"latents": np.zeros((1, 2, 2, 4)), "text": np.zeros(1), "meta": {}},
                             PATCH, 8, micro=("motion",))


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("t2v_micro"))
    t2v_pipeline(folder)
    return Generator.from_diffusers(folder)


def test_generator_samples_with_micro_values(gen):
    dit = build_dit(_as_config(gen.dit) | {"micro_conditioning": NAMES})
    micro_params = _perturbed(_init_like(dit, gen.dit_params))
    gen2 = dataclasses.replace(gen, dit=dit, dit_params=micro_params, mask_text=True)
    ctx, neg = text_embeddings(1, length=8)
    noise = gen.noise(0, 1, 5, 16, 16)
    with pytest.raises(ValueError, match="micro-conditioned on 'motion'.*--motion"):  # fps: default
        gen2.text_to_video(ctx, neg, noise, 2, 3.0, "latent")
    slow = gen2.with_micro(fps=16, motion=0.1).text_to_video(ctx, neg, noise, 2, 3.0, "latent")
    fast = gen2.with_micro(fps=16, motion=0.6).text_to_video(ctx, neg, noise, 2, 3.0, "latent")
    assert np.isfinite(np.asarray(slow)).all() and np.abs(np.asarray(slow - fast)).max() > 1e-4
    args = argparse.Namespace(workdir="run", mode=None, size="16x16", fps=12.0, motion=0.3,
                              video=None, image=None, frames=5)
    assert SampleJob(gen2, "vdit", args).gen.micro == {"fps": 12.0, "motion": 0.3}


def test_generator_and_cli_refuse_values_for_a_model_without_it(gen):
    with pytest.raises(ValueError, match=r"motion=0.3 given \(vdit sample --motion\).*not "
                                         r"micro-conditioned"):
        gen.with_micro(motion=0.3)
    with pytest.raises(ValueError, match=r"fps=8.0 given \(vdit sample --fps\)"):
        gen.generate(["a"], 5, 16, 16, fps=8.0)
    args = argparse.Namespace(workdir="run", mode=None, size="16x16", fps=12.0, motion=0.3,
                              video=None, image=None, frames=5)
    with pytest.raises(ValueError, match="--motion"):
        SampleJob(gen, "diffusers", args)
    # --fps alone is the output frame rate of a model without fps conditioning: no error.
    assert SampleJob(gen, "diffusers", argparse.Namespace(**(vars(args) | {"motion": None}))
                     ).fps == 12.0


def _as_config(dit):
    fields = set(type(dit).__dataclass_fields__) - {"parent", "name"}
    return {k: getattr(dit, k) for k in fields}


def _init_like(dit, base_params):
    """Loaded params plus freshly initialised (zero-output) micro-conditioning layers."""
    x = jnp.zeros((1, 1, 2, 2, dit.in_channels))
    fresh = nn.unbox(dit.init(jax.random.key(5), x, jnp.zeros(1),
                              jnp.zeros((1, 3, dit.text_dim)))["params"])
    return dict(base_params) | {"micro_embedder": fresh["micro_embedder"]}
