"""Parity with diffusers' WanTransformer3DModel on random weights, both conversion directions."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from dit_testing import tiny_model_config

from vdit.convert import wan_dit
from vdit.models.dit import build_dit

CONFIGS = {
    # (1,2,2) patches, 2 heads, affine cross-attention norm, text width 16.
    "a": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
              out_channels=4, text_dim=16, freq_dim=8, ffn_dim=32, num_layers=2,
              cross_attn_norm=True),
    # Asymmetric (2,1,2) patches, 3 heads, no cross-attention norm, text width 24, C_out != C_in.
    "b": dict(patch_size=(2, 1, 2), num_attention_heads=3, attention_head_dim=16, in_channels=3,
              out_channels=5, text_dim=24, freq_dim=16, ffn_dim=40, num_layers=2,
              cross_attn_norm=False),
}
LATENTS = {"a": (2, 3, 4, 6), "b": (2, 4, 3, 4)}  # B, T', H', W'


def _reference(name, tmp_path):
    cfg = dict(CONFIGS[name], eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # perturb everything so norms/biases/tables are all exercised
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = os.path.join(tmp_path, f"ref_{name}")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def _inputs(name, cfg):
    rng = np.random.default_rng(1)
    b, t, h, w = LATENTS[name]
    latents = rng.normal(size=(b, t, h, w, cfg["in_channels"])).astype(np.float32)
    context = rng.normal(size=(b, 7, cfg["text_dim"])).astype(np.float32)
    return latents, np.array([3.5, 917.0], np.float32), context


def _torch_forward(ref, latents, timesteps, context):
    with torch.no_grad():
        out = ref(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timesteps),
                  torch.from_numpy(context), return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dense_parity_and_round_trip(name, tmp_path, monkeypatch):
    ref, folder = _reference(name, tmp_path)
    dit, params = wan_dit.load_transformer(folder)
    latents, timesteps, context = _inputs(name, CONFIGS[name])
    ours = np.asarray(dit.apply({"params": params}, latents, timesteps, context))
    want = _torch_forward(ref, latents, timesteps, context)
    assert ours.shape == want.shape
    rel = np.linalg.norm(ours - want) / np.linalg.norm(want)
    print(f"config {name}: relative error {rel:.2e}")
    assert rel < 1e-4, rel

    out = os.path.join(tmp_path, f"ours_{name}")
    wan_dit.save_transformer(dit, params, out)
    # Without `accelerate` installed, from_pretrained refuses classes with fp32-pinned modules;
    # the pin only matters for half-precision loading, so lift it for this float32 check.
    monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)
    back = WanTransformer3DModel.from_pretrained(out).eval()
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    assert sorted(ref_sd) == sorted(back_sd)
    for key, value in ref_sd.items():
        np.testing.assert_array_equal(back_sd[key].numpy(), value.numpy(), err_msg=key)
    assert tuple(back.config.patch_size) == CONFIGS[name]["patch_size"]


def test_per_token_timesteps_match_diffusers(tmp_path):
    """Wan2.2 TI2V's `expand_timesteps`: a [B, N] timestep per patch token, the first latent
    frame's tokens at 0 (a clean image) and the rest at the step's t, in diffusers' token order."""
    ref, folder = _reference("a", tmp_path)
    dit, params = wan_dit.load_transformer(folder)
    latents, _, context = _inputs("a", CONFIGS["a"])
    b, t, h, w = LATENTS["a"]
    per_frame = (h // 2) * (w // 2)  # tokens per latent frame with (1, 2, 2) patches
    timesteps = np.repeat(np.array([[0.0], [731.0]], np.float32), t * per_frame, axis=1)
    timesteps[1, :per_frame] = 0.0  # row 1 as I2V: a clean first frame; row 0 all clean
    timesteps[0, per_frame:] = 212.0
    ours = np.asarray(dit.apply({"params": params}, latents, timesteps, context))
    want = _torch_forward(ref, latents, timesteps, context)
    rel = np.linalg.norm(ours - want) / np.linalg.norm(want)
    print(f"per-token timesteps: relative error {rel:.2e}")
    assert rel < 1e-4, rel
    # one timestep per row is the special case of equal per-token ones
    flat = np.array([3.5, 917.0], np.float32)
    same = dit.apply({"params": params}, latents, np.repeat(flat[:, None], t * per_frame, 1),
                     context)
    np.testing.assert_allclose(same, dit.apply({"params": params}, latents, flat, context),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"per token \[B=2, N=18\]"):
        dit.apply({"params": params}, latents, timesteps[:, :5], context)


def test_builder_from_config_matches_loaded_module(tmp_path):
    _, folder = _reference("a", tmp_path)
    dit, _ = wan_dit.load_transformer(folder, dtype="float32", remat="full")
    built = build_dit(tiny_model_config(rope_max_seq_len=64, remat="full"))
    assert dit == built


def test_mismatches_are_named_by_tensor(tmp_path):
    _, folder = _reference("a", tmp_path)
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["ffn_dim"] = 48  # weights were written for 32
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.net\.0\.proj\.weight: got \(32, 24\)"):
        wan_dit.load_transformer(folder)
    cfg["ffn_dim"], cfg["num_layers"] = 32, 3
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"missing tensors \['blocks\.2\.attn1\.norm_k\.weight'"):
        wan_dit.load_transformer(folder)
    cfg["num_layers"], cfg["window_sizes"] = 2, [1, 1]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="keys vdit does not know: \\['window_sizes'\\]"):
        wan_dit.load_transformer(folder)


def test_image_projections_without_image_tokens_fail_clearly():
    with pytest.raises(ValueError, match="added_kv_proj_dim=24 needs image_dim"):
        build_dit(tiny_model_config(added_kv_proj_dim=24))


def test_out_channels_missing_or_null_read_as_diffusers_does():
    """from_pretrained fills a missing out_channels with its default 16; a null means in_channels."""
    cfg = dict(CONFIGS["b"], patch_size=list(CONFIGS["b"]["patch_size"]))
    cfg.pop("out_channels")
    assert wan_dit.model_config_from_diffusers(cfg).out_channels == 16
    assert wan_dit.model_config_from_diffusers(cfg | {"out_channels": None}).out_channels == 3


def test_export_refuses_weights_diffusers_has_no_place_for(tmp_path):
    """Micro-conditioning and stray (e.g. unmerged LoRA) weights would be dropped: an error."""
    latents, timesteps, context = (np.zeros((1, 1, 4, 4, 4)), np.zeros((1,)), np.zeros((1, 3, 16)))
    micro = build_dit(tiny_model_config(micro_conditioning=("fps",)))
    params = micro.init(jax.random.key(0), latents, timesteps, context,
                        micro={"fps": np.zeros((1,))})["params"]
    with pytest.raises(ValueError, match=r"micro_conditioning=\['fps'\].*micro_embedder"):
        wan_dit.save_transformer(micro, params, str(tmp_path / "micro"))
    plain = build_dit(tiny_model_config())
    params = dict(plain.init(jax.random.key(0), latents, timesteps, context)["params"])
    params["proj_out"] = dict(params["proj_out"], lora_a=np.zeros((24, 2)))
    with pytest.raises(ValueError, match=r"\['proj_out/lora_a'\] have no diffusers tensor"):
        wan_dit.save_transformer(plain, params, str(tmp_path / "stray"))
    assert not os.path.exists(tmp_path / "stray")


def test_weight_files_are_read_as_diffusers_reads_them(tmp_path):
    """fp16 variant copies beside the weights are skipped; integer tensors, a broken shard index,
    a missing shard and a folder of another class are errors naming the file or tensor."""
    from safetensors.numpy import load_file, save_file

    ref, folder = _reference("a", tmp_path)
    ref.half().save_pretrained(folder, variant="fp16")
    _, params = wan_dit.load_transformer(folder)  # the float32 file, as from_pretrained reads
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    np.testing.assert_array_equal(params["proj_out"]["bias"], tensors["proj_out.bias"])
    os.remove(os.path.join(folder, "diffusion_pytorch_model.fp16.safetensors"))

    save_file(tensors | {"proj_out.bias": tensors["proj_out.bias"].astype(np.int32)}, weights)
    with pytest.raises(ValueError, match=r"not floating point \['proj_out.bias: int32'\]"):
        wan_dit.load_transformer(folder)
    os.remove(weights)
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:5]}, os.path.join(folder, "part-1.safetensors"))
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"weight_map": {k: "part-1.safetensors" if i < 5 else "part-2.safetensors"
                                  for i, k in enumerate(names)}}, f)
    with pytest.raises(FileNotFoundError, match=r"shards \['part-2.safetensors'\] listed in"):
        wan_dit.load_transformer(folder)
    with open(index, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"index.json' is not valid JSON"):
        wan_dit.load_transformer(folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config | {"_class_name": "AutoencoderKLWan"}, f)
    with pytest.raises(ValueError, match="_class_name='AutoencoderKLWan'; expected 'WanTrans"):
        wan_dit.load_transformer(folder)


@pytest.mark.parametrize("key, value, message", [
    ("num_layers", "2", r"num_layers='2': expected an int >= 1"),
    ("ffn_dim", None, r"ffn_dim=None: expected an int >= 1"),
    ("eps", -1.0, r"eps=-1.0: expected a number > 0"),
    ("patch_size", [1, 2], r"patch_size=\(1, 2\)"),
])
def test_config_values_of_the_wrong_type_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_dit(wan_dit.model_config_from_diffusers(
            {**CONFIGS["a"], "patch_size": list(CONFIGS["a"]["patch_size"]), key: value}))


# diffusers' own Wan I2V / FLF fast-test transformer: image tokens without their own k/v
# projections (no added_kv_proj_dim) join the text in cross-attention; FLF adds a position table
# and takes first and last frame's tokens as rows 2b and 2b + 1.
IMAGE_ONLY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                  in_channels=12, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                  num_layers=2, cross_attn_norm=True, rope_max_seq_len=32, image_dim=4)


@pytest.mark.parametrize("flf", [False, True])
def test_image_tokens_without_their_own_projections_match_diffusers(flf, tmp_path):
    cfg = dict(IMAGE_ONLY, pos_embed_seq_len=10) if flf else IMAGE_ONLY
    torch.manual_seed(1)
    ref = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    dit, params = wan_dit.load_transformer(str(tmp_path))
    rng = np.random.default_rng(2)
    latents = rng.normal(size=(2, 2, 4, 6, 12)).astype(np.float32)
    context = rng.normal(size=(2, 7, 16)).astype(np.float32)
    image = rng.normal(size=(4, 5, 4) if flf else (2, 6, 4)).astype(np.float32)
    timesteps = np.array([10.0, 700.0], np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timesteps),
                   torch.from_numpy(context), encoder_hidden_states_image=torch.from_numpy(image),
                   return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    ours = np.asarray(dit.apply({"params": params}, latents, timesteps, context,
                                image_context=image))
    assert np.linalg.norm(ours - want) / np.linalg.norm(want) < 1e-5
    if flf:  # vdit's own layout: each row's first and last frame tokens side by side
        same = dit.apply({"params": params}, latents, timesteps, context,
                         image_context=image.reshape(2, 10, 4))
        np.testing.assert_array_equal(same, ours)


def test_settings_diffusers_reads_its_own_way(tmp_path):
    """diffusers normalises q and k across heads whatever `qk_norm` says, and broadcasts one
    timestep over the batch."""
    ref, folder = _reference("a", tmp_path)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump(dict(config, qk_norm=None), f)
    dit, params = wan_dit.load_transformer(folder)
    latents, _, context = _inputs("a", CONFIGS["a"])
    one = np.array([417.0], np.float32)
    ours = np.asarray(dit.apply({"params": params}, latents, one, context))
    want = _torch_forward(ref, latents, one, context)
    assert np.linalg.norm(ours - want) / np.linalg.norm(want) < 1e-5
