"""Training an image branch (Wan2.1 I2V) end to end on tiny sizes: `vdit encode` stores each
clip's first-frame CLIP tokens (what `Generator.image_tokens` computes; from a seed or a converted
run's image_encoder/ folder), the Grain pipeline packs them per row under the clips' segment ids,
the step reads them (the loss moves with them; zeroed for text-to-video segments), resume stays
exact, and shards without them fail naming the shard and the key."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testing import VIDEOS, tiny_config, write_shards

from vdit.config import ConfigError
from vdit.convert import wan
from vdit.convert.diffusers_folder import image_parts
from vdit.data import encode, encode_images, image_tokens, pipeline, sources
from vdit.data.synthetic import SyntheticShapes
from vdit.models import patches
from vdit.models.dit import build_dit
from vdit.models.text import text_encoder_from_config
from vdit.models.vae_config import vae_from_config
from vdit.pipelines.generate import Generator
from vdit.runs import checkpoint
from vdit.train import conditioning, loop
from vdit.train.objective import make_dit_loss

CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=28, patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5)
N, D = 5, 16  # tokens per image: 1 + (28 / 14)^2; the tiny CLIP's width (= model.image_dim)
SHAPES = [(5, 16, 16)]  # 2 latent frames: every clip trains image-to-video


def _config(root, latents, *extra, **clip):
    config = tiny_config("shapes_dit", latents, f"--config.encode.vae_workdir={root}/vae",
                         "--config.train.i2v_rate=1.0", "--config.train.last_frame_rate=0.0",
                         "--config.encode.last_frame_condition=False",
                         "--config.encode.num_examples=8", "--config.encode.num_shards=1",
                         "--config.encode.batch_size=4", "--config.encode.shape_weights=[]",
                         *extra)
    config.encode.shapes = SHAPES
    config.model.update(dict(image_dim=D, added_kv_proj_dim=16))  # the tiny DiT's width
    config.image_encoder = dict(CLIP, seed=0) | clip
    return config


def _write_vae_run(workdir, config):
    """A random VAE (small weights) saved as a VAE run's EMA: latents that differ per clip."""
    vae = vae_from_config(config.vae)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(vae.init(jax.random.key(0),
                                                           jnp.zeros((1, 1, 4, 4, 3))))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.2 * rng.normal(size=s.shape).astype(np.float32), shapes)
    saved = config.copy_and_resolve_references()
    del saved["model"]
    manager = checkpoint.make_manager(workdir, config.checkpoint, with_data=False)
    checkpoint.save(manager, 1, {"ema": params}, saved)
    manager.wait_until_finished()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("i2vclip"))
    latents = os.path.join(root, "latents")
    config = _config(root, latents)
    _write_vae_run(os.path.join(root, "vae"), config)
    encode.encode_synthetic(config, latents)
    return {"root": root, "latents": latents, "config": config}


def _generator_tokens(config, module, params, settings, frames):
    gen = Generator(None, None, None, None, None, None, None, image_encoder=module,
                    image_encoder_params=params, image_processor=settings)
    return np.asarray(gen.image_tokens(frames))


def test_encode_stores_the_first_frames_clip_tokens(run, tmp_path):
    config, source = run["config"], sources.LatentShardSource(run["latents"])
    module, params, settings = encode_images.load_encoder(config)
    data = SyntheticShapes.from_config(config.data)
    firsts = []
    for i in range(len(source)):
        record = source[i]
        frames, height, width = encode.sample_shape(i, SHAPES, [], config.encode.seed)
        assert record["latents"].shape[0] == 1 + (frames - 1) // 4
        tokens = record[image_tokens.RECORD_KEY]
        assert tokens.shape == (N, D) and tokens.dtype == np.float32
        firsts.append(data.render(i, frames, height, width)["video"][0])
        want = _generator_tokens(config, module, params, settings, firsts[-1][None])[0]
        np.testing.assert_allclose(tokens, want, rtol=1e-5, atol=1e-5)  # what sampling feeds
    assert not np.allclose(source[0][image_tokens.RECORD_KEY], source[1][image_tokens.RECORD_KEY])
    # A converted run's image_encoder/ + image_processor/ folders (what `vdit convert` keeps and
    # `vdit sample` loads) give the tokens of the weights they hold, with their preprocessing.
    wan.save_image_encoder(module, params, str(tmp_path / "image_encoder"))
    (tmp_path / "image_processor").mkdir()
    (tmp_path / "image_processor" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 28, "width": 28}, "resample": 3}))
    folders = _config(run["root"], run["latents"], seed=None,
                      image_encoder_path=str(tmp_path / "image_encoder"),
                      image_processor_path=str(tmp_path / "image_processor"))
    # the loader `vdit encode` passes (the data layer does not import convert)
    fn = encode_images.encode_fn(folders, image_parts)
    got = fn(np.stack(firsts)[:, None])[image_tokens.RECORD_KEY]
    module2, params2, settings2 = encode_images.load_encoder(folders, image_parts)
    assert settings2.shortest_edge == 32 and settings2.crop_height == 28
    np.testing.assert_allclose(got, _generator_tokens(folders, module2, params2, settings2,
                                                      np.stack(firsts)), rtol=1e-5, atol=1e-5)


def test_encoder_config_errors(run):
    with pytest.raises(ValueError, match=r"names a CLIP folder, but no loader"):
        encode_images.load_encoder(_config(run["root"], run["latents"], image_encoder_path="x",
                                           image_processor_path="y"))
    cases = [(dict(seed=None), r"neither 'image_encoder_path'.*nor 'seed'"),
             (dict(hidden_size=32, intermediate_size=64), r"\[N, D\] = \[5, 32\].*expect \[5, 16\]"),
             (dict(image_encoder_path="x"), r"'image_encoder.image_processor_path' is not")]
    for clip, match in cases:
        with pytest.raises(ConfigError, match=match):
            encode_images.load_encoder(_config(run["root"], run["latents"], **clip))
    config = _config(run["root"], run["latents"], hidden_size=32)
    with pytest.raises(ConfigError, match=r"'image_encoder.hidden_size' = 32 but 'model.image_dim'"):
        conditioning.check_config(config, build_dit(config.model))


def _batches(config, count):
    dit = build_dit(config.model)
    it = iter(pipeline.packed_dataset(
        sources.LatentShardSource(config.data.latents_dir), config.data, dit.patch_size,
        np.zeros(1, np.int32), condition=True, image=conditioning.image_record_shape(config, dit)))
    return dit, [next(it) for _ in range(count)]


def test_pipeline_packs_each_clips_tokens_under_its_segment_id(run):
    config = run["config"]
    source = sources.LatentShardSource(run["latents"])
    by_tokens = {}
    for i in range(len(source)):
        tokens = patches.patchify(np.asarray(source[i]["latents"]), (1, 2, 2))[0]
        by_tokens[tokens.tobytes()] = source[i][image_tokens.RECORD_KEY]
    dit, batches = _batches(config, 2)
    seen = 0
    for batch in batches:
        n = conditioning.image_tokens_per_row(config)
        assert n == N * config.data.max_segments
        assert batch["image_context"].shape == (8, n, D)
        assert batch["image_segment_ids"].shape == (8, n)
        for row in range(8):
            seg, ids = batch["segment_ids"][row], batch["image_segment_ids"][row]
            for k in range(1, int(seg.max()) + 1):
                want = by_tokens[batch["tokens"][row][seg == k].tobytes()]
                np.testing.assert_array_equal(batch["image_context"][row][ids == k], want)
                seen += 1
            assert set(np.unique(ids[ids > 0])) == set(range(1, int(seg.max()) + 1))
            np.testing.assert_array_equal(batch["image_context"][row][ids == 0], 0.0)
    assert seen >= 16


def _random_text_params(text_model):
    """Random weights of the frozen text encoder without compiling its init (seconds on a CPU)."""
    ids = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(text_model.init(jax.random.key(0), ids, ids)))
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: 0.1 * rng.normal(size=s.shape).astype(np.float32),
                        shapes["params"])


def test_train_resumes_exactly_and_its_step_reads_the_tokens(run):
    config, root = run["config"], run["root"]
    full = loop.train(config, os.path.join(root, "full"), stop_after=3)
    first = loop.train(config, os.path.join(root, "resumed"), stop_after=2)  # saves step 2
    second = loop.train(config, os.path.join(root, "resumed"), stop_after=1)
    assert [h["step"] for h in first + second] == [1, 2, 3]
    assert all(np.isfinite(h["loss"]) for h in full)
    np.testing.assert_allclose([h["loss"] for h in first + second], [h["loss"] for h in full],
                               rtol=1e-6, atol=1e-7)

    # The step's loss on a pipeline batch moves with the CLIP tokens (the trained weights).
    dit, (batch,) = _batches(config, 1)
    text_model, _ = text_encoder_from_config(config.text)
    params = {"dit": checkpoint.load_params(os.path.join(root, "full"), "params")[0]["dit"],
              "text": _random_text_params(text_model)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    zeroed = dict(batch, image_context=jnp.zeros_like(batch["image_context"]))
    loss_fn = jax.jit(make_dit_loss(dit, text_model, config))
    loss = lambda b: float(loss_fn(params, {}, b, jax.random.key(3))[0])
    assert abs(loss(batch) - loss(zeroed)) > 1e-4
    # Segments the step's draw leaves text-to-video get zero tokens, as they get zero condition
    # latents: all of them at i2v_rate 0, the undrawn ones at 0.5.
    rng, k = jax.random.key(3), config.data.max_segments
    assert not np.any(conditioning.image_kwargs(dit, batch, rng, 0.0, k)["image_context"])
    half = np.asarray(conditioning.image_kwargs(dit, batch, rng, 0.5, k)["image_context"])
    flags = np.asarray(conditioning.i2v_flags(dit, batch, rng, 0.5, k))
    ids, image = np.asarray(batch["image_segment_ids"]), np.asarray(batch["image_context"])
    kept = np.take_along_axis(flags, np.maximum(ids - 1, 0), axis=1) * (ids > 0)
    assert 0 < kept.sum() < (ids > 0).sum()
    np.testing.assert_array_equal(half, kept[..., None] * image)


def test_shards_without_the_tokens_fail_naming_shard_and_key(run, tmp_path):
    latents = write_shards(str(tmp_path / "latents"), VIDEOS)
    config = _config(run["root"], latents, "--config.train.i2v_rate=0.0")
    with pytest.raises(ValueError, match=r"latent shard '.*latents-00000-of-00001.array_record' "
                                         r"has no 'first_frame_clip_tokens'.*image branch"):
        loop.train(config, str(tmp_path / "run"), stop_after=1)
    with pytest.raises(ValueError, match=r"has no 'first_frame_clip_tokens'.*`vdit encode`"):
        image_tokens.record_tokens({"latents": 0}, (N, D))
    with pytest.raises(ValueError, match=r"shape \(4, 16\); config expects .* \[5, 16\]"):
        image_tokens.record_tokens({image_tokens.RECORD_KEY: np.zeros((4, 16))}, (N, D))
