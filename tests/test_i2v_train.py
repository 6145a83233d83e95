"""Image-to-video segments mixed into DiT training (Wan2.1 I2V input layout): the per-patch
interleave, packed I2V forward == dense call on [noisy | mask | cond], `vdit encode`'s cond_latents
== Generator.condition_from_frames, a tiny I2V-capable run (with fps/motion micro-conditioning)
that trains from shards holding cond_latents, and config errors."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from dit_testing import pack_row, tiny_model_config
from generate_testing import t2v_pipeline, text_embeddings
from test_train import TINY

from vdit.config import ConfigError, load_config, recipe
from vdit.data import conditions, encode, sources
from vdit.data.synthetic import SyntheticShapes
from vdit.models import patches
from vdit.models.dit import build_dit
from vdit.models.tokenizers import ByteTokenizer
from vdit.models.vae_config import vae_from_config
from vdit.pipelines import generate
from vdit.pipelines.generate import Generator
from vdit.train import conditioning, loop

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_dit.py")
Z, TF = 4, 4


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_interleave_equals_patchify_of_concat(patch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 4, 6, Z)).astype(np.float32)
    c = rng.normal(size=(2, 4, 4, 6, TF + Z)).astype(np.float32)
    joined = conditioning.interleave(jnp.asarray(patches.patchify_batch(x, patch)),
                                     jnp.asarray(patches.patchify_batch(c, patch)),
                                     int(np.prod(patch)))
    np.testing.assert_array_equal(np.asarray(joined),
                                  patches.patchify_batch(np.concatenate([x, c], -1), patch))


def test_packed_i2v_forward_equals_dense_call():
    dit = build_dit(tiny_model_config(in_channels=2 * Z + TF, out_channels=Z))
    params = jax.jit(dit.init)(jax.random.key(0), jnp.zeros((1, 1, 2, 2, 2 * Z + TF)),
                               jnp.zeros(1), jnp.zeros((1, 3, 16)))["params"]
    packed = jax.jit(lambda *a: dit.apply({"params": params}, *a, method="packed"))
    dense = jax.jit(lambda *a: dit.apply({"params": params}, *a))
    rng = np.random.default_rng(1)
    noisy = [rng.normal(size=s + (Z,)).astype(np.float32) for s in ((2, 4, 4), (1, 2, 6))]
    cond = [rng.normal(size=v.shape[:3] + (TF + Z,)).astype(np.float32) for v in noisy]
    texts = [rng.normal(size=(n, 16)).astype(np.float32) for n in (3, 2)]
    ts = np.array([300.0, 40.0], np.float32)
    tokens, pos, seg, t, ctx, ctx_seg, slices = pack_row(noisy, texts, ts, (1, 2, 2), 24, 8)
    cond_tok, *_ = pack_row(cond, texts, ts, (1, 2, 2), 24, 8)
    batch = {"segment_ids": jnp.asarray(seg[None]), "positions": jnp.asarray(pos[None]),
             conditions.COND_TOKENS: jnp.asarray(cond_tok[None])}
    # every video segment I2V / none (condition and mask zero); the 1-frame image never is
    for rate in (1.0, 0.0):
        x_in = conditioning.model_input(dit, jnp.asarray(tokens[None]), batch, jax.random.key(2),
                                        rate, num_segments=2)
        out = packed(x_in, pos[None], seg[None], t[None], ctx[None], ctx_seg[None])[0]
        for k in range(2):
            given = rate if noisy[k].shape[0] > 1 else 0.0
            ref = dense(np.concatenate([noisy[k], cond[k] * given], -1)[None], ts[k:k + 1],
                        texts[k][None])
            assert ref.shape[-1] == Z
            np.testing.assert_allclose(np.asarray(out[slices[k]]),
                                       patches.patchify(np.asarray(ref[0]), (1, 2, 2))[0],
                                       atol=1e-5, rtol=1e-5)


def test_encode_writes_cond_latents_like_the_generator(tmp_path):
    vae_cfg = recipe("shapes_vae").vae
    vae_cfg.update(dict(base_dim=4, dim_mult=[1, 1, 1], z_dim=Z, latents_mean=[0.0] * Z,
                        latents_std=[1.0] * Z))
    vae = vae_from_config(vae_cfg)
    # Random encoder weights without compiling an init; encode shares the Generator's compile.
    shapes = jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 5, 16, 16, 3)),
                                             method="encode")["params"])
    leaves, tree = jax.tree.flatten(nn.unbox(shapes))
    rng = np.random.default_rng(0)
    vae_params = jax.tree.unflatten(tree, [0.3 * rng.normal(size=x.shape).astype(np.float32)
                                           for x in leaves])
    encode_fn = lambda v: generate._encode(vae, vae_params, v)
    mean, std = np.linspace(-0.2, 0.3, Z, dtype=np.float32), np.linspace(0.5, 2.0, Z, dtype=np.float32)
    config = ml_collections.ConfigDict({"vae": vae_cfg, "encode": {"i2v_condition": True,
                                                                  "last_frame_condition": True}})
    cfg = ml_collections.ConfigDict(dict(shapes=[(5, 16, 16)], shape_weights=[], seed=0,
                                         batch_size=2))
    data = SyntheticShapes(frames=5, height=16, width=16)
    examples = encode._encode_indices(range(2), data, cfg, encode_fn, ByteTokenizer(128), mean, std,
                                      conditions.encode_condition_fn(config, encode_fn, mean, std))
    path = str(tmp_path / "latents-00000-of-00001.array_record")
    sources.write_shard(path, examples)
    gen = Generator(None, None, vae, vae_params, None, mean, std)
    source = sources.LatentShardSource([path])
    for i in range(len(source)):
        record = source[i]
        want = gen.condition_from_frames(data.render(i)["video"][None], [True, False, False, False, False])
        assert record["cond_latents"].shape == (2, 4, 4, TF + Z)
        np.testing.assert_allclose(record["cond_latents"], np.asarray(want[0]), atol=1e-5, rtol=1e-5)
        both = gen.condition_from_frames(data.render(i)["video"][None], [True, False, False, False, True])
        np.testing.assert_allclose(record["cond_latents_last"], np.asarray(both[0]), atol=1e-5,
                                   rtol=1e-5)
        assert not np.allclose(record["cond_latents_last"], record["cond_latents"])
        assert record["meta"]["motion"] == pytest.approx(data.motion(i))
    assert conditions.encode_condition_fn(ml_collections.ConfigDict({"encode": {}}), encode_fn,
                                          mean, std) is None


def _write_shards(folder):
    tok = ByteTokenizer(32)
    rng = np.random.default_rng(0)
    examples = []
    for i, (t, h, w) in enumerate([(1, 4, 4), (2, 4, 8), (3, 4, 4), (2, 8, 4)] * 4):
        latents = rng.normal(size=(t, h, w, 8)).astype(np.float32) + (i % 3)
        mask = patches.i2v_mask(conditions.first_frame_known(1 + 4 * (t - 1)), (h, w), 4)
        first = np.zeros_like(latents)
        first[0] = latents[0] + 0.1 * rng.normal(size=latents[0].shape)
        ids, m = tok(["a red circle moving left"])
        examples.append({"latents": latents, "text": ids[0][: int(m[0].sum())], "caption": "c",
                         "cond_latents": np.concatenate([mask, first], -1),
                         "cond_latents_last": np.concatenate([mask, first[::-1]], -1),
                         "meta": {"fps": 8.0, "motion": 0.1 * (i % 4)}})
    sources.write_shard(os.path.join(folder, "latents-00000-of-00001.array_record"), examples)


def _config(workdir, rate=0.5, in_channels=20):
    config = load_config(CONFIG, TINY + [f"--config.data.latents_dir={workdir}/latents",
                                         f"--config.model.in_channels={in_channels}",
                                         "--config.train.steps=3", "--config.checkpoint.every=10"])
    config.train.i2v_rate = rate
    config.train.last_frame_rate = 0.5  # half the conditioned clips read cond_latents_last
    config.model.micro_conditioning = ["fps", "motion"]
    return config


def test_tiny_i2v_run_trains_from_cond_latents(tmp_path):
    workdir = str(tmp_path)
    _write_shards(os.path.join(workdir, "latents"))
    config = _config(workdir)
    dit = build_dit(config.model)
    spec = loop.batch_spec(config, dit, None)
    assert spec["tokens"].shape[-1] == 4 * 8 and spec["cond_tokens"].shape[-1] == 4 * 12
    assert spec["micro_fps"].shape == spec["micro_motion"].shape == (8, 4)
    history = loop.train(config, workdir)
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)


def test_config_errors(tmp_path):
    config = _config(str(tmp_path), in_channels=8)
    with pytest.raises(ConfigError, match=r"'train.i2v_rate' = 0.5.*'model.in_channels' = 2 \* z "
                                          r"\+ 4 = 20.*got 8"):
        conditioning.check_config(config, build_dit(config.model))
    config = _config(str(tmp_path), rate=1.5)
    with pytest.raises(ConfigError, match=r"'train.i2v_rate' = 1.5; expected a fraction"):
        conditioning.check_config(config, build_dit(config.model))
    config = _config(str(tmp_path), rate=0.0, in_channels=14)
    with pytest.raises(ConfigError, match="takes 6 extra input channels"):
        conditioning.check_config(config, build_dit(config.model))
    with pytest.raises(ValueError, match="encode.i2v_condition=True"):
        conditions.cond_tokens({"latents": np.zeros((1, 2, 2, 8))}, (1, 2, 2, 8), (1, 2, 2))


def test_generator_text_to_video_on_an_i2v_capable_model_feeds_zeros(tmp_path):
    t2v_pipeline(str(tmp_path))
    gen = Generator.from_diffusers(str(tmp_path))
    dit = build_dit(tiny_model_config(in_channels=2 * Z + TF, out_channels=Z))
    params = jax.jit(dit.init)(jax.random.key(0), jnp.zeros((1, 1, 2, 2, 2 * Z + TF)),
                               jnp.zeros(1), jnp.zeros((1, 3, 16)))["params"]
    gen = dataclasses.replace(gen, dit=dit, dit_params=nn.unbox(params), mask_text=True)
    assert gen.condition_channels == TF + Z
    ctx, neg = text_embeddings(1, length=8)
    noise = gen.noise(0, 1, 5, 16, 16)
    t2v = gen.text_to_video(ctx, neg, noise, 2, 3.0, "latent")
    zeros = jnp.zeros(noise.shape[:-1] + (TF + Z,))
    ref = gen.sample(noise, ctx, neg, 2, 3.0, "latent", condition=zeros)
    np.testing.assert_array_equal(np.asarray(t2v), np.asarray(ref))
