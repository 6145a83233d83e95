"""diffusers AutoencoderKLWan folders <-> WanVAE: names and shapes for many layouts, a save -> load
round trip through diffusers' own loader, and errors naming bad tensors or config keys."""

import json
import os

import flax
import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.numpy import load_file, save_file
from vae_reference import decode, encode, from_torch, reference_vae, rel_err, state_tensors, to_torch

from vdit.config import load_config
from vdit.convert.wan_vae import (
    WEIGHTS_NAME,
    load_vae,
    params_from_torch,
    params_to_torch,
    save_vae,
    torch_shapes,
)
from vdit.models.vae_config import diffusers_config, vae_from_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.mark.parametrize("config", [
    dict(base_dim=8, z_dim=4),
    dict(base_dim=8, z_dim=4, num_res_blocks=3, dim_mult=[1, 2], temperal_downsample=[True]),
    dict(base_dim=6, decoder_base_dim=10, z_dim=3, dim_mult=[1, 3, 2, 2, 1],
         temperal_downsample=[False, True, False, True], in_channels=4, out_channels=2),
    # Wan2.2's layout (residual blocks, 2x2 patches) at a reduced width, and an odd variant
    dict(base_dim=16, decoder_base_dim=32, z_dim=48, is_residual=True, patch_size=2,
         in_channels=12, out_channels=12, scale_factor_spatial=16),
    dict(base_dim=4, z_dim=5, is_residual=True, patch_size=1, dim_mult=[1, 2, 2],
         temperal_downsample=[True, False], num_res_blocks=3),
])
def test_tensor_names_and_shapes_match_diffusers(config):
    vae = vae_from_config(config)
    ref = AutoencoderKLWan(**{k: v for k, v in diffusers_config(vae).items()
                              if not k.startswith("_")})
    assert torch_shapes(vae) == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_shapes_vae_config_builds_a_diffusers_compatible_vae():
    config = load_config(os.path.join(CONFIG_DIR, "shapes_vae.py"))
    vae = vae_from_config(config.vae)
    ref = AutoencoderKLWan(**{k: v for k, v in diffusers_config(vae).items()
                              if not k.startswith("_")})
    assert torch_shapes(vae) == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert (vae.spatial_factor, vae.temporal_factor) == (4, 4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random diffusers VAE, its conversion, and the folder our save_vae wrote from it."""
    ref = reference_vae("custom", seed=1)
    vae = vae_from_config(dict(ref.config))
    params = params_from_torch(vae, state_tensors(ref), "reference")
    folder = str(tmp_path_factory.mktemp("vae"))
    save_vae(vae, params, folder)
    return ref, vae, params, folder


def test_save_then_load_round_trips_through_diffusers(saved):
    ref, vae, params, folder = saved
    reloaded, info = AutoencoderKLWan.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    assert dict(reloaded.config)["temperal_downsample"] == [True, False]
    want = state_tensors(ref)
    got = state_tensors(reloaded.eval())
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)

    vae2, params2 = load_vae(folder)
    assert vae2 == vae
    flat, flat2 = (flax.traverse_util.flatten_dict(p) for p in (params, params2))
    assert sorted(flat) == sorted(flat2)
    assert all(np.array_equal(flat[k], flat2[k]) for k in flat)

    # the shapes of the 17-frame parity case in test_vae.py: one compilation serves both
    video = np.random.default_rng(2).uniform(-1, 1, (2, 17, 16, 24, 3)).astype(np.float32)
    with torch.no_grad():
        dist = reloaded.encode(to_torch(video)).latent_dist
        out = from_torch(reloaded.decode(dist.mean).sample)
    mean, logvar = encode(vae2, params2, video)
    assert rel_err(mean, from_torch(dist.mean)) < 1e-4
    assert rel_err(logvar, from_torch(dist.logvar)) < 1e-4
    assert rel_err(decode(vae2, params2, from_torch(dist.mean)), out) < 1e-4


def test_wan22_folder_loads_and_saves_back(tmp_path):
    """A Wan2.2 VAE folder written by diffusers -> `wan.load_vae` -> `save_vae` -> diffusers again,
    tensors bit-identical both ways (encode/decode parity is in test_vae.py)."""
    ref = reference_vae("wan22", seed=3)
    ref.save_pretrained(str(tmp_path / "in"))
    vae, params = load_vae(str(tmp_path / "in"))
    assert (vae.is_residual, vae.patch_size, vae.z_dim, vae.spatial_factor,
            vae.video_channels) == (True, 2, 6, 16, 3)
    want = state_tensors(ref)
    assert all(np.array_equal(v, want[k]) for k, v in params_to_torch(vae, params).items())
    save_vae(vae, params, str(tmp_path / "out"))
    reloaded, info = AutoencoderKLWan.from_pretrained(str(tmp_path / "out"),
                                                      output_loading_info=True)
    assert not any(info.values()), info
    assert {k: v for k, v in reloaded.config.items() if not k.startswith("_")} == \
        {k: v for k, v in ref.config.items() if not k.startswith("_")}
    got = state_tensors(reloaded)
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def _copy_with(saved_folder, tmp_path, edit_tensors=None, edit_config=None):
    folder = str(tmp_path / "edited")
    os.makedirs(folder)
    tensors = load_file(os.path.join(saved_folder, WEIGHTS_NAME))
    with open(os.path.join(saved_folder, "config.json")) as f:
        config = json.load(f)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("decoder.conv_out.bias"), r"missing tensors \['decoder.conv_out.bias'\]"),
    (lambda t: t.update({"encoder.extra.weight": np.zeros(2, np.float32)}),
     r"unexpected tensors \['encoder.extra.weight'\]"),
    (lambda t: t.update({"quant_conv.weight": np.zeros((8, 8, 1, 1), np.float32)}),
     r"quant_conv.weight: got \(8, 8, 1, 1\), expected \(8, 8, 1, 1, 1\)"),
])
def test_bad_tensors_are_named(saved, tmp_path, edit, message):
    folder = _copy_with(saved[3], tmp_path, edit_tensors=edit)
    with pytest.raises(ValueError, match=message):
        load_vae(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(colour=1), r"unknown VAE config keys \['colour'\]"),
    (lambda c: c.update(is_residual=True), "is_residual=True"),
    (lambda c: c.update(z_dim=0), "z_dim=0"),
])
def test_bad_config_json_is_named(saved, tmp_path, edit, message):
    folder = _copy_with(saved[3], tmp_path, edit_config=edit)
    with pytest.raises(ValueError, match=message):
        load_vae(folder)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder '.*nowhere' does not exist"):
        load_vae(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(str(tmp_path / "empty"))


def test_params_with_wrong_shape_cannot_be_saved(saved, tmp_path):
    _, vae, params, _ = saved
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["quant_conv"]["bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="quant_conv/bias"):
        save_vae(vae, bad, str(tmp_path / "out"))
