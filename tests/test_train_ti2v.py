"""Wan2.2 TI2V training (`sample.expand_timesteps` on a DiT without condition channels): a drawn
share of the videos keep their first latent frame clean, its tokens at timestep 0 and out of the
loss, while the other segments of the same packed rows train as text-to-video."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from train_testing import VIDEOS, tiny_config, write_shards

from vdit.config import ConfigError
from vdit.data import pipeline, sources
from vdit.diffusion import flow
from vdit.train import conditioning, loop
from vdit.train.objective import make_loss_terms


def _ti2v_config(latents: str, rate: float = 0.5, *extra: str):
    config = tiny_config("shapes_dit", latents, "--config.model.in_channels=8",
                         f"--config.train.i2v_rate={rate}", *extra)
    config.sample.expand_timesteps = True
    return config


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("ti2v") / "latents"), VIDEOS)


def test_first_frame_tokens_are_clean_at_t0_and_carry_no_loss(latents):
    config = _ti2v_config(latents)
    k = config.data.max_segments
    dit, text_model, _ = loop.build_models(config)
    assert conditioning.clean_first_frame(config, dit)
    weights = nn.meta.unbox(loop.init_params(dit, text_model, config, jax.random.key(0)))
    params, frozen = loop.split_trainable(config, weights)
    source = sources.LatentShardSource(latents)
    batch = jax.tree.map(jnp.asarray, next(iter(pipeline.packed_dataset(
        source, config.data, dit.patch_size, np.asarray([1], np.int32)))))
    seg, frame = batch["segment_ids"], batch["positions"][..., 0]
    rng = jax.random.key(5)
    flags = conditioning.first_frame_flags(batch, rng, 0.5, k)
    clean = np.asarray((frame == 0) & (seg > 0) & (flow.per_token(flags, seg) > 0))
    # The rows mix both kinds: conditioned videos, unconditioned videos, and images (never).
    videos = np.asarray(flow.segment_token_counts(jnp.where(frame > 0, seg, 0), k) > 0)
    assert 0 < np.asarray(flags).sum() < videos.sum()
    assert not np.any(np.asarray(flags)[~videos])

    t_seg = jax.random.uniform(jax.random.key(1), (seg.shape[0], k), minval=0.2, maxval=0.9)
    terms = make_loss_terms(dit, text_model, config)
    seen = []

    def record(f, args, kwargs, context):
        if context.method_name == "packed":
            jax.debug.callback(lambda *a: seen.append([np.asarray(x) for x in a]), args[0],
                               args[3], kwargs["time_ids"])
        return f(*args, **kwargs)

    loss = jax.jit(lambda noise: terms(params, frozen, batch, t_seg, noise, rng)[0])
    noise = jax.random.normal(jax.random.key(2), batch["tokens"].shape)
    other = jax.random.normal(jax.random.key(3), batch["tokens"].shape)
    with nn.intercept_methods(record):
        base = float(loss(noise))
    jax.effects_barrier()
    tokens, columns, time_ids = seen[0]
    per_token = np.take_along_axis(columns, np.maximum(time_ids - 1, 0), axis=1)
    present = np.asarray(seg) > 0
    assert np.all(per_token[clean] == 0)
    np.testing.assert_allclose(per_token[present & ~clean],
                               1000 * np.asarray(flow.per_token(t_seg, seg))[present & ~clean],
                               rtol=1e-6)
    np.testing.assert_array_equal(tokens[clean], np.asarray(batch["tokens"])[clean])
    # Noise on the clean tokens changes nothing; noise anywhere else does.
    on_clean = jnp.where(clean[..., None], other, noise)
    assert float(loss(on_clean)) == base
    on_rest = jnp.where((present & ~clean)[..., None], other, noise)
    assert float(loss(on_rest)) != base


def test_ti2v_needs_a_temporal_patch_of_one(latents):
    config = _ti2v_config(latents, 0.5, "--config.model.patch_size=[2, 2, 2]")
    dit, _, _ = loop.build_models(config)
    with pytest.raises(ConfigError, match="temporal patch of 1"):
        conditioning.check_config(config, dit)
    config.sample.expand_timesteps = False
    with pytest.raises(ConfigError, match="sample.expand_timesteps"):
        conditioning.check_config(config, dit)
