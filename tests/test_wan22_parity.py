"""Wan2.2 sampling against diffusers on tiny random weights: the two-expert A14B pipelines (T2V and
I2V; the expert and its guidance chosen per step by timestep) and TI2V image-to-video (clean image
latent in frame 0, per-token timesteps). Same noise, scheduler, steps and guidance give the same
final latents (float32)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from generate_testing import Z22, Z, a14b_pipeline, text_embeddings, ti2v_i2v_pipeline
from PIL import Image
from safetensors.numpy import save_file
from vae_reference import from_torch, rel_err, to_torch

from vdit.pipelines.generate import Generator
from vdit.sample_cli import load_generator, needs_image

FRAMES, STEPS = 9, 4


def _noise(shape, seed=3):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _image(size, seed=5):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _pixels(image, batch):
    return np.repeat((image.astype(np.float32) / 255.0 * 2.0 - 1.0)[None], batch, axis=0)


def _reference(pipe, ctx, neg, noise, size, image=None, **kw):
    extra = {} if image is None else {"image": Image.fromarray(image)}
    with torch.no_grad():
        ref = pipe(prompt_embeds=torch.from_numpy(ctx), negative_prompt_embeds=torch.from_numpy(neg),
                   height=size, width=size, num_frames=FRAMES, num_inference_steps=STEPS,
                   latents=to_torch(noise), output_type="latent", return_dict=False, **extra,
                   **kw)[0]
    return from_torch(ref)


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_two_expert_sampling_matches_diffusers(i2v, tmp_path):
    """4 UniPC steps at flow shift 3 have timesteps 999, 900, 750, 500: with boundary_ratio 0.875
    two steps run each expert, each with its own guidance."""
    pipe = a14b_pipeline(str(tmp_path), i2v=i2v)
    gen = Generator.from_diffusers(str(tmp_path))
    assert gen.dit_2 is not None and gen.boundary == 875.0
    _, timesteps = gen.sampler.schedule(STEPS)
    high = int(np.sum(timesteps >= gen.boundary))
    assert 0 < high < STEPS, timesteps
    ctx, neg = text_embeddings(2)
    noise = _noise((2, 3, 4, 4, Z))
    kw = dict(steps=STEPS, guidance=5.0, guidance_2=2.0, output="latent")
    if i2v:
        image = _image(32)
        ours = gen.image_to_video(_pixels(image, 2), ctx, neg, noise, **kw)
        # I2V-A14B has I2V channels but no CLIP branch: never trained without an image, so
        # text-to-video's zero condition is refused (diffusers' pipeline requires `image`).
        assert gen.image_only and needs_image(gen)
        with pytest.raises(ValueError, match="image-to-video model.*give an image"):
            gen.text_to_video(ctx, neg, noise, steps=1)
    else:
        assert not gen.image_only and not needs_image(gen)
        image = None
        ours = gen.text_to_video(ctx, neg, noise, **kw)
    ref = _reference(pipe, ctx, neg, noise, 32, image, guidance_scale=5.0, guidance_scale_2=2.0)
    err = rel_err(ours, ref)
    print(f"a14b {'i2v' if i2v else 't2v'}: relative error {err:.2e}")
    assert err < 1e-3, err
    if not i2v:  # the low-noise expert's own guidance matters: another value moves the result
        other = gen.text_to_video(ctx, neg, noise, steps=STEPS, guidance=5.0, output="latent")
        assert rel_err(other, ref) > 1e-3
        # A run's sample.guidance / guidance_2 (Wan2.2 A14B's 4.0 / 3.0) are both the defaults;
        # guidance_2 was never read, so the low-noise expert sampled at `guidance`.
        run = dataclasses.replace(gen, defaults={**gen.defaults, "guidance": 5.0,
                                                 "guidance_2": 2.0})
        np.testing.assert_array_equal(
            run.text_to_video(ctx, neg, noise, steps=STEPS, output="latent"), ours)
        np.testing.assert_array_equal(  # an explicit guidance applies to both, as in diffusers
            run.text_to_video(ctx, neg, noise, steps=STEPS, guidance=5.0, output="latent"), other)
        # guidance <= 1 turns guidance off for both experts, guidance_2 too (diffusers' rule)
        with pytest.warns(UserWarning, match="guidance_2=3.0 is ignored"):
            ours = gen.text_to_video(ctx, neg, noise, steps=STEPS, guidance=1.0, guidance_2=3.0,
                                     output="latent")
        ref = _reference(pipe, ctx, neg, noise, 32, guidance_scale=1.0, guidance_scale_2=3.0)
        assert rel_err(ours, ref) < 1e-3


def test_ti2v_image_to_video_matches_diffusers(tmp_path):
    pipe = ti2v_i2v_pipeline(str(tmp_path))
    # The published TI2V-5B vae/config.json carries "clip_output", which diffusers ignores.
    vae_config = tmp_path / "vae" / "config.json"
    vae_config.write_text(json.dumps(json.loads(vae_config.read_text()) | {"clip_output": False}))
    gen = Generator.from_diffusers(str(tmp_path))
    assert gen.expand_timesteps and gen.condition_channels == 0
    assert gen.defaults["fps"] == 24.0 and not gen.image_only  # 720p at 24 fps; T2V allowed
    assert (gen.defaults["height"], gen.defaults["width"], gen.defaults["frames"]) == (704, 1280, 121)
    ctx, neg = text_embeddings(1)
    size = 64  # 4x4 latents at 16x
    noise = _noise((1, 3, 4, 4, Z22), seed=4)
    image = _image(size, seed=8)
    ours = gen.image_to_video(_pixels(image, 1), ctx, neg, noise, steps=STEPS, guidance=5.0,
                              output="latent")
    ref = _reference(pipe, ctx, neg, noise, size, image, guidance_scale=5.0)
    err = rel_err(ours, ref)
    print(f"ti2v i2v: relative error {err:.2e}")
    assert err < 1e-3, err
    # frame 0 is the image's latent exactly
    np.testing.assert_allclose(np.asarray(ours[:, 0]),
                               np.asarray(gen.encode_video(_pixels(image, 1)[:, None])[:, 0]))


def test_two_expert_folder_errors_are_named(tmp_path):
    a14b_pipeline(str(tmp_path))
    gen = Generator.from_diffusers(str(tmp_path))
    ctx, neg = text_embeddings(1)
    single = Generator(**{k: v for k, v in vars(gen).items()
                          if k not in ("dit_2", "dit_2_params", "boundary")})
    with pytest.raises(ValueError, match="guidance_2=2.0 needs a two-expert model"):
        single.text_to_video(ctx, neg, _noise((1, 3, 4, 4, Z)), steps=2, guidance_2=2.0)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps(index | {"boundary_ratio": 1.5}))
    with pytest.raises(ValueError, match="boundary_ratio=1.5"):
        Generator.from_diffusers(str(tmp_path))
    index_path.write_text(json.dumps({k: v for k, v in index.items() if k != "boundary_ratio"}))
    with pytest.raises(ValueError, match="needs both transformer_2/ and boundary_ratio"):
        Generator.from_diffusers(str(tmp_path))
    index_path.unlink()  # not mistaken for a vdit run folder ("has no checkpoints/")
    with pytest.raises(FileNotFoundError, match="needs its model_index.json"):
        load_generator(str(tmp_path))


def _lora_file(path, seed, original):
    """Random LoRA factors on both blocks' self-attention and FFN, in the original Wan names
    (lora_down/lora_up, alpha 2 for rank 4) or diffusers' (lora_A/lora_B)."""
    rng = np.random.default_rng(seed)
    names = {"self_attn.q": "attn1.to_q", "self_attn.o": "attn1.to_out.0",
             "ffn.0": "ffn.net.0.proj"}
    sd = {}
    for i in range(2):
        for theirs, ours in names.items():
            out = 32 if theirs == "ffn.0" else 24
            down, up = rng.normal(size=(4, 24)) * 0.3, rng.normal(size=(out, 4)) * 0.3
            if original:
                key = f"diffusion_model.blocks.{i}.{theirs}"
                sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                       f"{key}.alpha": np.array(2.0)}
            else:
                key = f"transformer.blocks.{i}.{ours}"
                sd |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
    save_file({k: np.asarray(v, np.float32) for k, v in sd.items()}, path)


def test_two_expert_loras_match_diffusers(tmp_path):
    """A LoRA on each expert (`vdit sample --lora high:0.8 --lora-2 low`) samples what diffusers'
    load_lora_weights (the second with load_into_transformer_2) at those strengths does."""
    pipe = a14b_pipeline(str(tmp_path / "pipe"))
    high, low = str(tmp_path / "high.safetensors"), str(tmp_path / "low.safetensors")
    _lora_file(high, 1, original=True)
    _lora_file(low, 2, original=False)
    pipe.load_lora_weights(high, adapter_name="high")
    pipe.load_lora_weights(low, adapter_name="low", load_into_transformer_2=True)
    pipe.transformer.set_adapters(["high"], weights=[0.8])
    pipe.transformer_2.set_adapters(["low"], weights=[1.0])
    gen, _ = load_generator(str(tmp_path / "pipe"), [f"{high}:0.8"], [low])
    ctx, neg = text_embeddings(1)
    noise = _noise((1, 3, 4, 4, Z))
    ours = gen.text_to_video(ctx, neg, noise, steps=STEPS, guidance=5.0, guidance_2=2.0,
                             output="latent")
    ref = _reference(pipe, ctx, neg, noise, 32, guidance_scale=5.0, guidance_scale_2=2.0)
    plain = Generator.from_diffusers(str(tmp_path / "pipe")).text_to_video(
        ctx, neg, noise, steps=STEPS, guidance=5.0, guidance_2=2.0, output="latent")
    err = rel_err(ours, ref)
    print(f"a14b with two LoRAs: relative error {err:.2e}, LoRAs moved it {rel_err(plain, ref):.2f}")
    assert rel_err(plain, ref) > 1e-2
    assert err < 1e-3, err
    with pytest.raises(ValueError, match="expected 'high' or 'low'"):
        gen.with_lora(low, expert="sideways")
