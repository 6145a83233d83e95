"""Generator.from_diffusers against diffusers' own Wan pipelines on tiny random weights: the same
initial noise, scheduler, steps and guidance give the same final latents (float32)."""

import json

import numpy as np
import pytest
import torch
from generate_testing import Z22, i2v_pipeline, t2v_pipeline, text_embeddings, ti2v_pipeline
from PIL import Image
from vae_reference import from_torch, rel_err, to_torch

from vdit.convert import wan_dit
from vdit.convert.safetensors_io import read_tensors
from vdit.pipelines.generate import Generator

FRAMES, SIZE, STEPS, GUIDANCE = 9, 32, 4, 5.0
LATENT = (3, 4, 4, 4)  # T', H', W', C for 9 frames at 32x32 (8x spatial, 4x temporal)


def _noise(batch, seed=3):
    return np.random.default_rng(seed).normal(size=(batch, *LATENT)).astype(np.float32)


def test_text_to_video_matches_wan_pipeline(tmp_path):
    pipe = t2v_pipeline(str(tmp_path))
    gen = Generator.from_diffusers(str(tmp_path))
    ctx, neg = text_embeddings(2)
    noise = _noise(2)
    # a negative prompt of another length than the prompt: diffusers runs the two separately
    for negative in (neg, neg[:, :9]):
        ours = gen.text_to_video(ctx, negative, noise, steps=STEPS, guidance=GUIDANCE,
                                 output="latent")
        with torch.no_grad():
            ref = pipe(prompt_embeds=torch.from_numpy(ctx),
                       negative_prompt_embeds=torch.from_numpy(np.ascontiguousarray(negative)),
                       height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE, latents=to_torch(noise), output_type="latent",
                       return_dict=False)[0]
        err = rel_err(ours, from_torch(ref))
        print(f"t2v unipc, negative length {negative.shape[1]}: relative error {err:.2e}")
        assert err < 1e-3, err


def test_ti2v_text_to_video_matches_wan_pipeline(tmp_path):
    """Wan2.2 TI2V-5B's layout (2.2 VAE, expand_timesteps) sampling text-to-video."""
    pipe = ti2v_pipeline(str(tmp_path))
    gen = Generator.from_diffusers(str(tmp_path))
    assert gen.vae.spatial_factor == 16
    ctx, neg = text_embeddings(1)
    size = 64  # 4x4 latents at 16x
    noise = np.random.default_rng(4).normal(size=(1, 3, 4, 4, Z22)).astype(np.float32)
    ours = gen.text_to_video(ctx, neg, noise, steps=STEPS, guidance=GUIDANCE, output="latent")
    with torch.no_grad():
        ref = pipe(prompt_embeds=torch.from_numpy(ctx),
                   negative_prompt_embeds=torch.from_numpy(neg),
                   height=size, width=size, num_frames=FRAMES, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=to_torch(noise), output_type="latent",
                   return_dict=False)[0]
    err = rel_err(ours, from_torch(ref))
    print(f"ti2v t2v unipc: relative error {err:.2e}")
    assert err < 1e-3, err


def _image(seed):
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize("flf", [False, True], ids=["i2v", "first_last_frame"])
def test_image_to_video_matches_wan_i2v_pipeline(flf, tmp_path):
    pipe = i2v_pipeline(str(tmp_path), flf=flf)
    gen = Generator.from_diffusers(str(tmp_path))
    assert gen.condition_channels == 8 and gen.dit.has_image_branch
    ctx, neg = text_embeddings(2)
    noise = _noise(2)
    first, last = _image(5), _image(6)
    # diffusers' I2V pipeline conditions every prompt of the batch on one image
    pixels = lambda u: np.repeat((u.astype(np.float32) / 255.0 * 2.0 - 1.0)[None], 2, axis=0)
    ours = gen.image_to_video(pixels(first), ctx, neg, noise, steps=STEPS, guidance=GUIDANCE,
                              output="latent", last_image=pixels(last) if flf else None)
    with torch.no_grad():
        ref = pipe(image=Image.fromarray(first), last_image=Image.fromarray(last) if flf else None,
                   prompt_embeds=torch.from_numpy(ctx),
                   negative_prompt_embeds=torch.from_numpy(neg),
                   height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=to_torch(noise), output_type="latent",
                   return_dict=False)[0]
    err = rel_err(ours, from_torch(ref))
    print(f"i2v flf={flf}: relative error {err:.2e}")
    assert err < 1e-3, err


def test_scheduler_and_latent_statistics_come_from_the_folder(tmp_path):
    t2v_pipeline(str(tmp_path), "euler")
    gen = Generator.from_diffusers(str(tmp_path))
    assert gen.sampler.spec.kind == "euler" and gen.sampler.spec.shift == 5.0
    np.testing.assert_allclose(gen.latents_std, [1.5, 0.7, 2.0, 1.1])
    np.testing.assert_allclose(gen.latents_mean, [0.3, -0.2, 0.1, 0.5])
    assert gen.text_model is None and gen.image_encoder is None


def test_i2v_transformer_converts_both_ways(tmp_path):
    """The image branch's tensors (image_embedder, add_k/v_proj, norm_added_k, pos_embed) load
    and save back unchanged; stray norm_added_q tensors are ignored as diffusers does."""
    i2v_pipeline(str(tmp_path / "pipe"), flf=True)
    src = str(tmp_path / "pipe" / "transformer")
    tensors = read_tensors(src)
    assert "condition_embedder.image_embedder.pos_embed" in tensors
    extra = dict(tensors, **{"blocks.0.attn2.norm_added_q.weight": np.ones(24, np.float32)})
    dit, params = wan_dit.load_transformer(src)
    assert dit.has_image_branch and dit.pos_embed_seq_len == 34
    wan_dit.params_from_diffusers(dit, extra, "with norm_added_q")
    wan_dit.save_transformer(dit, params, str(tmp_path / "back"))
    back = read_tensors(str(tmp_path / "back"))
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_pipeline_folder_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Generator.from_diffusers(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        Generator.from_diffusers(str(tmp_path))
    index = tmp_path / "model_index.json"
    write = lambda d: index.write_text(json.dumps(d))
    write({"_class_name": "StableDiffusionPipeline"})
    with pytest.raises(ValueError, match="_class_name='StableDiffusionPipeline'"):
        Generator.from_diffusers(str(tmp_path))
    write({"_class_name": "WanPipeline", "boundary_ratio": 0.9})
    with pytest.raises(ValueError, match="transformer_2/ absent, boundary_ratio=0.9"):
        Generator.from_diffusers(str(tmp_path))
    write({"_class_name": "WanVideoToVideoPipeline", "expand_timesteps": True})
    with pytest.raises(NotImplementedError, match="expand_timesteps=true with WanVideoToVideo"):
        Generator.from_diffusers(str(tmp_path))
    write({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]})
    (tmp_path / "transformer").mkdir()
    with pytest.raises(FileNotFoundError, match="no vae/ component"):
        Generator.from_diffusers(str(tmp_path))
