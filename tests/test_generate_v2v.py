"""Video-to-video, image-to-video by pinning, and the conditioning pieces, on tiny random models:
shapes and plumbing, pinned frames kept, reproducible seeds, errors that name the problem.

Every Generator call here uses batch 2, 9 frames at 32x32 and 512 text tokens, as the parity
tests do, so the VAE and the sampling loops compile once per session."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generate_testing import i2v_pipeline, smooth_video, t2v_pipeline, text_embeddings

from vdit.data import video_io
from vdit.diffusion.samplers import make_sampler
from vdit.models import patches
from vdit.pipelines import conditioning
from vdit.pipelines import video_to_video as v2v
from vdit.pipelines.generate import Generator

# Wan2.1's diffusers default solver (what the recipes' sample.scheduler holds).
DEFAULT_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000,
                     "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                     "flow_shift": 3.0, "solver_order": 2, "predict_x0": True,
                     "solver_type": "bh2", "lower_order_final": True}

STEPS = 4


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("t2v"))
    t2v_pipeline(folder)
    return Generator.from_diffusers(folder)


@pytest.fixture(scope="module")
def text():
    return text_embeddings(2)


def _noise(gen, seed=0):
    return gen.noise(seed, 2, 9, 32, 32)


# ----------------------------------------------------------------- conditioning pieces (no DiT)

def test_i2v_mask_folds_the_first_frame_into_four_channels():
    known = conditioning.known_pixel_frames(9, first=1, last=1)
    mask = patches.i2v_mask(known, (2, 3), 4)
    assert mask.shape == (3, 2, 3, 4)
    np.testing.assert_array_equal(mask[:, 0, 0], [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]])
    five = patches.i2v_mask(conditioning.known_pixel_frames(9, first=5), (1, 1), 4)
    np.testing.assert_array_equal(five[:, 0, 0], [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="1 \\+ 4k pixel frames"):
        patches.i2v_mask(np.ones(8, bool), (1, 1), 4)


class _Swirl:
    """A made-up velocity field coupling frames (hashable, no parameters)."""

    def __call__(self, x, t):
        return (jnp.sin(3.0 * x) + 0.5 * jnp.mean(x, axis=1, keepdims=True)
                + 0.01 * t[:, None, None, None, None])

    def __hash__(self):
        return 1

    def __eq__(self, other):
        return isinstance(other, _Swirl)


@pytest.mark.parametrize("scheduler", [DEFAULT_SCHEDULER, {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}], ids=["unipc", "euler"])
def test_pinned_frames_follow_the_noising_path_to_the_known_latents(scheduler):
    sampler = make_sampler(scheduler)
    rng = np.random.default_rng(0)
    known = jnp.asarray(rng.normal(size=(2, 4, 2, 2, 3)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=known.shape), jnp.float32)
    mask = conditioning.latent_frame_mask(2, 4, [0, 3])
    pin = (known * mask, jnp.asarray(mask), noise)
    x = conditioning.pin_start(noise, pin, float(sampler.schedule(6)[0][0]))
    out = sampler.sample(conditioning.PinnedVelocity(_Swirl()), x, 6, pin)
    # the solver itself (no final replacement) lands the pinned frames on the known latents
    np.testing.assert_allclose(out[:, [0, 3]], known[:, [0, 3]], atol=2e-5)
    free = sampler.sample(_Swirl(), noise, 6)
    assert float(jnp.abs(out[:, 1:3] - free[:, 1:3]).max()) > 1e-3  # context changes the rest


# ----------------------------------------------------------------- workflows on a T2V model

def test_restyle_is_reproducible_and_strength_sets_the_start(gen, text):
    ctx, neg = text
    video = smooth_video(2)
    run = lambda seed, strength: np.asarray(v2v.restyle(
        gen, video, ctx, neg, _noise(gen, seed), strength, STEPS, 5.0, output="latent"))
    a, b, c = run(0, 0.5), run(0, 0.5), run(1, 0.5)
    assert a.shape == (2, 3, 4, 4, 4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4
    x0 = np.asarray(gen.encode_video(video))
    # a weak edit stays nearer the input's latents than fresh noise does
    fresh = np.asarray(gen.text_to_video(ctx, neg, _noise(gen, 0), STEPS, 5.0, "latent"))
    assert np.linalg.norm(a - x0) < np.linalg.norm(fresh - x0)


def test_extend_pins_the_context_latents_and_appends_frames(gen, text):
    ctx, neg = text
    video = smooth_video(2, seed=1)
    new = v2v.extend(gen, video, ctx, neg, _noise(gen), 5, STEPS, 5.0, output="latent")
    canvas = np.zeros_like(video)
    canvas[:, :5] = video[:, 4:]
    want = np.asarray(gen.encode_video(canvas))[:, :2]
    np.testing.assert_allclose(np.asarray(new)[:, :2], want, atol=1e-5)
    full = v2v.extend(gen, video, ctx, neg, _noise(gen), 5, STEPS, 5.0, output="video")
    assert full.shape == (2, 9 - 5 + 9, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(full[:, :4]), video[:, :4])
    with pytest.raises(ValueError, match="context_frames=3: expected 1 \\+ 4k .*use context_frames=1"):
        v2v.extend(gen, video, ctx, neg, _noise(gen), 3, STEPS, 5.0)
    with pytest.raises(ValueError, match="context_frames=9"):
        v2v.extend(gen, video, ctx, neg, _noise(gen), 9, STEPS, 5.0)


def test_image_to_video_and_interpolation_pin_keyframes(gen, text):
    ctx, neg = text
    first, last = smooth_video(2, seed=2)[:, 0], smooth_video(2, seed=3)[:, 0]
    out = np.asarray(v2v.interpolate(gen, first, last, ctx, neg, _noise(gen), STEPS, 5.0,
                                     output="latent"))
    guide = np.concatenate([first[:, None], np.repeat(last[:, None], 8, 1)], 1)
    encoded = np.asarray(gen.encode_video(guide))
    np.testing.assert_allclose(out[:, [0, 2]], encoded[:, [0, 2]], atol=1e-5)
    i2v = np.asarray(gen.image_to_video(first, ctx, neg, _noise(gen), STEPS, 5.0, "latent"))
    np.testing.assert_allclose(i2v[:, 0], encoded[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="image must be \\[B, H, W, 3\\] = \\(2, 32, 32, 3\\)"):
        gen.image_to_video(first[:, :16], ctx, neg, _noise(gen), STEPS, 5.0)


def test_upscale_resizes_then_restyles(gen, text):
    ctx, neg = text
    small = smooth_video(2, height=16, width=16, seed=4)
    out = v2v.upscale(gen, small, ctx, neg, _noise(gen), 0.5, STEPS, 5.0)
    assert out.shape == (2, 9, 32, 32, 3)
    assert float(jnp.abs(out).max()) <= 1.0
    with pytest.raises(ValueError, match="larger than the target 32x32 .* on both sides"):
        v2v.upscale(gen, smooth_video(2, height=48, width=48), ctx, neg, _noise(gen), 0.5, STEPS)
    # taller but narrower than the target: covering it scales up (to 96x32), then crops
    tall = v2v.upscale(gen, smooth_video(2, height=48, width=16), ctx, neg, _noise(gen), 0.5,
                       STEPS, 5.0)
    assert tall.shape == (2, 9, 32, 32, 3)


def test_upscale_keeps_the_aspect_of_another_shaped_video():
    """A 16x24 clip upscaled to 32x32 is resized to cover (32x48) and center-cropped, as the other
    modes fit their inputs, not stretched."""
    small = smooth_video(2, height=16, width=24, seed=4)
    up = v2v.resize_batch(small, 32, 32)
    want = np.stack([video_io.resize_video(v, 32, 48)[:, :, 8:40] for v in small])
    assert up.shape == (2, 9, 32, 32, 3)
    np.testing.assert_allclose(up, want, atol=1e-6)


def test_bad_inputs_are_named(gen, text):
    ctx, neg = text
    with pytest.raises(ValueError, match="noise must be latents \\[B, T', H', W', C=4\\]"):
        gen.text_to_video(ctx, neg, np.zeros((2, 3, 4, 4, 5), np.float32), STEPS)
    with pytest.raises(ValueError, match="negative_context must be \\[B=2"):
        gen.text_to_video(ctx, neg[:1], _noise(gen), STEPS)
    with pytest.raises(ValueError, match="video is \\[B, T, H, W\\] = \\(2, 5, 32, 32\\)"):
        v2v.restyle(gen, smooth_video(2, frames=5), ctx, neg, _noise(gen), 0.5, STEPS)
    with pytest.raises(ValueError, match="strength=0"):
        v2v.restyle(gen, smooth_video(2), ctx, neg, _noise(gen), 0, STEPS)
    with pytest.raises(ValueError, match="frames must be 1\\+4k .*nearest valid: 9 or 13"):
        gen.noise(0, 1, 10, 32, 32)
    with pytest.raises(ValueError, match="height=40 must be a positive multiple of 16"):
        gen.noise(0, 1, 9, 40, 32)
    with pytest.raises(ValueError, match="num_steps=2.5; expected an integer"):
        gen.text_to_video(ctx, neg, _noise(gen), 2.5)
    # pixels outside [-1, 1] (uint8 frames, a [0, 255] float image) were cast and used silently
    video = smooth_video(2)
    with pytest.raises(ValueError, match="video: expected float pixels in \\[-1, 1\\], got dtype "
                                         "uint8"):
        v2v.restyle(gen, ((video + 1) * 127.5).astype(np.uint8), ctx, neg, _noise(gen), 0.5, STEPS)
    with pytest.raises(ValueError, match="image: pixel values span \\[25.*\\]; expected \\[-1, 1\\]"):
        gen.image_to_video((video[:, 0] + 1) * 127.5, ctx, neg, _noise(gen), STEPS)


# ----------------------------------------------------------------- an I2V model

def test_i2v_model_extends_with_conditioning_channels(tmp_path):
    i2v_pipeline(str(tmp_path))
    gen = Generator.from_diffusers(str(tmp_path))
    ctx, neg = text_embeddings(2)
    video = smooth_video(2, seed=5)
    noise = gen.noise(0, 2, 9, 32, 32)
    a = v2v.extend(gen, video, ctx, neg, noise, None, STEPS, 5.0, output="latent")
    b = v2v.extend(gen, video, ctx, neg, noise, None, STEPS, 5.0, output="latent")
    assert a.shape == (2, 3, 4, 4, 4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="takes 8 conditioning channels"):
        gen.text_to_video(ctx, neg, noise, STEPS)
    embeds = jax.random.normal(jax.random.key(0), (2, 17, 16))
    c = gen.image_to_video(video[:, 0], ctx, neg, noise, STEPS, 5.0, "latent", image_embeds=embeds)
    assert c.shape == (2, 3, 4, 4, 4)
