"""LoRA files in diffusers' formats: vdit merges them as diffusers' `load_lora_adapter` applies
them (random weights, diffusers / peft names with and without peft metadata, the original Wan
names with alphas and bias deltas, a Conv3d adapter, strength != 1), and vdit's own adapters
written in diffusers' format load there with the same result."""


import json
import re

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
from flax import traverse_util
from peft import LoraConfig
from safetensors.numpy import save_file

from vdit.convert import wan_dit, wan_lora
from vdit.models import lora

CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
           out_channels=4, text_dim=16, freq_dim=8, ffn_dim=32, num_layers=2, cross_attn_norm=True,
           eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
I2V = dict(CFG, image_dim=20, added_kv_proj_dim=24)
D, FFN, PATCH = 24, 32, 4 * 1 * 2 * 2  # model width, ffn width, patch inputs


def _reference(cfg, tmp_path):
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = str(tmp_path / "ref")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def _inputs(cfg):
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(2, 3, 4, 6, cfg["in_channels"])).astype(np.float32)
    # diffusers' image-conditioned attention takes the last 512 context tokens as the text
    text_len = 512 if "image_dim" in cfg else 7
    context = rng.normal(size=(2, text_len, cfg["text_dim"])).astype(np.float32)
    image = (rng.normal(size=(2, 5, cfg["image_dim"])).astype(np.float32)
             if "image_dim" in cfg else None)
    return latents, np.array([3.5, 917.0], np.float32), context, image


def _torch_forward(ref, latents, timesteps, context, image):
    with torch.no_grad():
        out = ref(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timesteps),
                  torch.from_numpy(context), return_dict=False,
                  encoder_hidden_states_image=None if image is None else torch.from_numpy(image))
    return out[0].permute(0, 2, 3, 4, 1).numpy()


def _ours(dit, params, latents, timesteps, context, image):
    return np.asarray(dit.apply({"params": params}, latents, timesteps, context, image))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _factors(rng, rank, fan_out, fan_in, prefix):
    return {f"{prefix}.lora_A.weight": rng.normal(size=(rank, fan_in)).astype(np.float32) * 0.3,
            f"{prefix}.lora_B.weight": rng.normal(size=(fan_out, rank)).astype(np.float32) * 0.3}


def _diffusers_file(rng):
    """Per-module ranks, a bias delta, a Conv3d adapter; no metadata (scale 1)."""
    sd = {}
    for i in range(2):
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                sd |= _factors(rng, 3 if proj == "to_v" else 4, D, D,
                               f"transformer.blocks.{i}.{attn}.{proj}")
        sd |= _factors(rng, 4, FFN, D, f"transformer.blocks.{i}.ffn.net.0.proj")
        sd[f"transformer.blocks.{i}.ffn.net.0.proj.lora_B.bias"] = rng.normal(size=FFN).astype(
            np.float32)
    sd |= _factors(rng, 2, PATCH, D, "transformer.proj_out")
    sd |= _factors(rng, 4, 6 * D, D, "transformer.condition_embedder.time_proj")
    sd["transformer.patch_embedding.lora_A.weight"] = rng.normal(size=(3, 4, 1, 2, 2)).astype(
        np.float32) * 0.3
    sd["transformer.patch_embedding.lora_B.weight"] = rng.normal(size=(D, 3, 1, 1, 1)).astype(
        np.float32) * 0.3
    return sd


def _original_file(rng, i2v):
    """The original Wan names: lora_down/lora_up with alphas, diff_b, head.head.diff."""
    sd = {}
    for i in range(2):
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                name = f"diffusion_model.blocks.{i}.{attn}.{proj}"
                sd[f"{name}.lora_down.weight"] = rng.normal(size=(4, D))
                sd[f"{name}.lora_up.weight"] = rng.normal(size=(D, 4)) * 0.3
                sd[f"{name}.alpha"] = np.array(2.0)
                sd[f"{name}.diff_b"] = rng.normal(size=D) * 0.1
        if i2v:
            for proj in ("k_img", "v_img"):
                name = f"diffusion_model.blocks.{i}.cross_attn.{proj}"
                sd[f"{name}.lora_down.weight"] = rng.normal(size=(4, D))
                sd[f"{name}.lora_up.weight"] = rng.normal(size=(D, 4)) * 0.3
        for ffn, shape in (("ffn.0", (FFN, D)), ("ffn.2", (D, FFN))):
            name = f"diffusion_model.blocks.{i}.{ffn}"
            sd[f"{name}.lora_down.weight"] = rng.normal(size=(4, shape[1]))
            sd[f"{name}.lora_up.weight"] = rng.normal(size=(shape[0], 4)) * 0.3
            sd[f"{name}.alpha"] = np.array(8.0)
    sd["diffusion_model.head.head.diff"] = rng.normal(size=(PATCH, D)) * 0.1
    sd["diffusion_model.head.head.diff_b"] = rng.normal(size=PATCH) * 0.1
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _musubi_file(rng):
    """musubi-tuner's names ("lora_unet_blocks_0_self_attn_q.lora_down.weight", alphas)."""
    sd = {}
    for key, value in _original_file(rng, False).items():
        match = re.fullmatch(r"diffusion_model\.(blocks\..+?)\.(lora_down\.weight|lora_up\.weight|"
                             r"alpha)", key)
        if match:
            sd[f"lora_unet_{match.group(1).replace('.', '_')}.{match.group(2)}"] = value
    return sd


def _diffusers_with_lora(ref_folder, path, strength):
    ref = WanTransformer3DModel.from_pretrained(ref_folder).eval()
    state = WanLoraLoaderMixin.lora_state_dict(path)  # converts the original names
    _, metadata = WanLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    ref.load_lora_adapter(state, prefix="transformer", adapter_name="x", metadata=metadata)
    ref.set_adapters(["x"], weights=[strength])
    return ref


CASES = {"diffusers": (CFG, None), "diffusers_metadata": (CFG, "full"),
         "diffusers_metadata_no_alpha": (CFG, "no_alpha"), "original": (CFG, None),
         "original_unprefixed": (CFG, None), "original_i2v": (I2V, None), "musubi": (CFG, None)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_file_merges_as_diffusers_applies_it(case, tmp_path):
    cfg, with_metadata = CASES[case]
    _, folder = _reference(cfg, tmp_path)
    rng = np.random.default_rng(7)
    sd = (_original_file(rng, "image_dim" in cfg) if case.startswith("original") else
          _musubi_file(rng) if case == "musubi" else _diffusers_file(rng))
    ref_path = path = str(tmp_path / "lora.safetensors")
    if case == "original_unprefixed":  # some trainers leave "diffusion_model." out
        ref_path = str(tmp_path / "prefixed.safetensors")  # what diffusers reads
        save_file(sd, ref_path)
        sd = {k.removeprefix("diffusion_model."): v for k, v in sd.items()}
    if with_metadata:  # peft's config as diffusers saves it: alpha 6 for rank 4, 1.5 for to_v
        ranks = {k.removeprefix("transformer.").split(".lora_A")[0]: v.shape[0]
                 for k, v in sd.items() if ".lora_A." in k}
        meta = LoraConfig(r=4, lora_alpha=6.0, rank_pattern={k: r for k, r in ranks.items()
                                                             if r != 4},
                          alpha_pattern={k: 1.5 for k in ranks if k.endswith("to_v")},
                          target_modules=sorted(ranks), lora_bias=True).to_dict()
        meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
        if with_metadata == "no_alpha":  # peft's default alpha (8) then applies
            meta = {k: meta[k] for k in ("r", "rank_pattern", "target_modules", "lora_bias")}
        WanLoraLoaderMixin.save_lora_weights(  # as a diffusers pipeline writes it
            str(tmp_path), {k.removeprefix("transformer."): torch.from_numpy(v)
                            for k, v in sd.items()},
            weight_name="lora.safetensors", transformer_lora_adapter_metadata=meta)
    else:
        save_file(sd, path)
    strength = 0.7
    latents, timesteps, context, image = _inputs(cfg)
    want = _torch_forward(_diffusers_with_lora(folder, ref_path, strength), latents, timesteps,
                          context, image)
    dit, params = wan_dit.load_transformer(folder)
    base = _ours(dit, params, latents, timesteps, context, image)
    merged = wan_lora.merge_lora_file(dit, params, path, strength)
    ours = _ours(dit, merged, latents, timesteps, context, image)
    print(f"{case}: relative error {_rel(ours, want):.2e}, LoRA moved output {_rel(base, want):.2f}")
    assert _rel(base, want) > 0.05  # the LoRA matters
    assert _rel(ours, want) < 1e-5


def test_original_diffs_are_applied_where_diffusers_drops_them(tmp_path):
    """A norm's `.diff` and a linear's whole-weight `.diff` are added (diffusers drops them)."""
    _, folder = _reference(CFG, tmp_path)
    dit, params = wan_dit.load_transformer(folder)
    norm = np.linspace(-1, 1, D).astype(np.float32)
    full = np.arange(D * D, dtype=np.float32).reshape(D, D) / (D * D)
    path = str(tmp_path / "diff.safetensors")
    save_file({"diffusion_model.blocks.1.self_attn.norm_q.diff": norm,
               "diffusion_model.blocks.0.cross_attn.o.diff": full,
               "diffusion_model.blocks.0.modulation.diff": np.ones((1, 6, D), np.float32)}, path)
    merged = wan_lora.merge_lora_file(dit, params, path, 0.5)
    blocks, before = merged["blocks"], params["blocks"]
    np.testing.assert_allclose(blocks["attn1"]["norm_q"]["scale"][1],
                               before["attn1"]["norm_q"]["scale"][1] + 0.5 * norm.reshape(2, 12))
    np.testing.assert_allclose(blocks["attn2"]["to_out"]["kernel"][0],
                               before["attn2"]["to_out"]["kernel"][0] + 0.5 * full.T.reshape(2, 12, D),
                               rtol=1e-6)
    np.testing.assert_array_equal(blocks["attn2"]["to_out"]["kernel"][1],
                                  before["attn2"]["to_out"]["kernel"][1])
    np.testing.assert_allclose(blocks["scale_shift_table"][0],
                               before["scale_shift_table"][0] + 0.5, rtol=1e-6)
    assert merged["proj_out"]["kernel"] is params["proj_out"]["kernel"]  # untouched leaves kept


@pytest.mark.parametrize("sd, match", [
    ({"transformer.blocks.0.attn1.to_q.lora_magnitude_vector": np.ones(24)}, "does not know"),
    ({}, "holds no tensors"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.ones((4, 24)),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": np.ones((24, 4)),
      "blocks.0.attn1.to_q.lora_B.weight": np.ones((24, 4))}, "are the same tensor"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.ones((4, 24))}, "only one of its two"),
    ({"transformer.blocks.5.attn1.to_q.lora_A.weight": np.ones((4, 24)),
      "transformer.blocks.5.attn1.to_q.lora_B.weight": np.ones((24, 4))}, r"blocks\.5\.attn1"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.ones((4, 30)),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": np.ones((24, 4))}, "has shape"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.ones((4, 24)),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": np.ones((24, 3))}, "do not chain"),
])
def test_bad_lora_files_are_named(sd, match, tmp_path):
    _, folder = _reference(CFG, tmp_path)
    dit, params = wan_dit.load_transformer(folder)
    path = str(tmp_path / "bad.safetensors")
    save_file({k: np.asarray(v, np.float32) for k, v in sd.items()}, path)
    with pytest.raises(ValueError, match=match):
        wan_lora.merge_lora_file(dit, params, path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wan_lora.merge_lora_file(dit, params, str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        wan_lora.merge_lora_file(dit, params, str(tmp_path / "lora.pt"))


def test_lora_metadata_that_is_not_an_object_is_named(tmp_path):
    path = str(tmp_path / "meta.safetensors")
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.ones((4, 24), np.float32)},
              path, metadata={"lora_adapter_metadata": "[1, 2]"})
    with pytest.raises(ValueError, match="holds a JSON list; expected an object"):
        wan_lora.read_lora(path)


def test_vdit_adapter_loads_in_diffusers(tmp_path):
    """vdit's adapter tree (attention, FFN, the patch Conv3d, the head; alpha != rank) written in
    diffusers' format: diffusers with it loaded == vdit's merge, and reading it back gives the
    same merged weights."""
    _, folder = _reference(CFG, tmp_path)
    dit, params = wan_dit.load_transformer(folder)
    latents, timesteps, context, image = _inputs(CFG)
    boxed = dit.init(jax.random.key(0), latents, timesteps, context)["params"]
    cfg = ml_collections.ConfigDict(dict(rank=3, alpha=5.0, targets=[
        "blocks/attn(1|2)/to_(q|k|v|out)/kernel$", "blocks/ffn/linear_(1|2)/kernel$",
        "patch_embedding/kernel$", "proj_out/kernel$"]))
    adapter = jax.tree.map(np.asarray, nn.unbox(lora.init_adapters(jax.random.key(1), boxed, cfg)))
    rng = np.random.default_rng(3)
    adapter = jax.tree.map(lambda x: x + 0.2 * rng.normal(size=x.shape).astype(np.float32), adapter)
    merged = lora.merge_lora(params, adapter, cfg)
    sd = wan_lora.adapter_to_diffusers(dit, adapter, lora.scale(cfg))
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    save_file(sd, path)
    want = _ours(dit, merged, latents, timesteps, context, image)
    got = _torch_forward(_diffusers_with_lora(folder, path, 1.0), latents, timesteps, context,
                         image)
    assert _rel(want, _ours(dit, params, latents, timesteps, context, image)) > 0.05
    assert _rel(got, want) < 1e-5, _rel(got, want)
    # vdit's own adapter file (as `vdit export --adapter` writes it, alpha and rank in the
    # adapter_config.json beside it) merges as vdit's merge does; its folder picks the
    # diffusers file
    vdit_path = str(tmp_path / "adapter.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in
               traverse_util.flatten_dict(adapter, sep="/").items()}, vdit_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"rank": 3, "alpha": 5.0, "diffusers": {"lora": "pytorch_lora_weights.safetensors"}}))
    assert wan_lora.lora_file(str(tmp_path), "--lora") == path
    for file in (path, vdit_path):
        back = wan_lora.merge_lora_file(dit, params, file)
        for (k, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(back)[0],
                                  jax.tree_util.tree_flatten_with_path(merged)[0], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{file} {k}")
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="no adapter_config.json .* give the "
                                         "pytorch_lora_weights.safetensors"):
        wan_lora.merge_lora_file(dit, params, vdit_path)


def test_nonfinite_lora_tensors_are_named(tmp_path):
    """A NaN or inf in a LoRA file would merge silently into an all-black video."""
    path = str(tmp_path / "nan.safetensors")
    b = np.ones((24, 4), np.float32)
    b[0, 0] = np.nan
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.ones((4, 24), np.float32),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": b}, path)
    with pytest.raises(ValueError, match=r"nan.safetensors': tensor 'transformer.blocks.0.attn1."
                                         r"to_q.lora_B.weight' holds 1 NaN or inf values"):
        wan_lora.read_lora(path)


def test_donated_merge_frees_the_replaced_device_arrays(tmp_path):
    """With donate, each replaced device leaf is deleted (the device never holds it twice); the
    merged weights equal the plain merge, dtype and sharding kept."""
    _, folder = _reference(CFG, tmp_path)
    dit, params = wan_dit.load_transformer(folder)
    path = str(tmp_path / "lora.safetensors")
    save_file(_diffusers_file(np.random.default_rng(5)), path)
    want = wan_lora.merge_lora_file(dit, params, path, 0.5)
    on_device = jax.tree.map(lambda x: jax.device_put(x.astype(jax.numpy.bfloat16)), params)
    got = wan_lora.merge_lora_file(dit, on_device, path, 0.5, donate=True)
    assert on_device["blocks"]["attn1"]["to_q"]["kernel"].is_deleted()
    assert not on_device["blocks"]["norm2"]["scale"].is_deleted()  # untouched: kept, same object
    assert got["blocks"]["norm2"]["scale"] is on_device["blocks"]["norm2"]["scale"]
    kernel = got["blocks"]["attn1"]["to_q"]["kernel"]
    assert kernel.dtype == jax.numpy.bfloat16 and isinstance(kernel, jax.Array)
    np.testing.assert_allclose(np.asarray(kernel, np.float32),
                               want["blocks"]["attn1"]["to_q"]["kernel"], rtol=2e-2, atol=2e-2)
