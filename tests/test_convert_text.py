"""UMT5 encoder folders: load/save round trips and errors that name the tensor or key."""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from text_testing import SMALL_CONFIGS, torch_encoder

from vdit.convert.wan_text import load_text_encoder, save_text_encoder
from vdit.models.text import encoder_from_dict

CFG = SMALL_CONFIGS["gated"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("umt5"))
    torch_encoder(CFG).save_pretrained(path)
    return path


def _copy_with(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    config, tensors = edit(config, tensors)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_save_then_transformers_reads_the_same_model(folder, tmp_path):
    from transformers import UMT5EncoderModel

    module, params = load_text_encoder(folder)
    save_text_encoder(module, params, str(tmp_path))
    again_module, again = load_text_encoder(str(tmp_path))
    assert again_module == module
    jax.tree.map(np.testing.assert_array_equal, again, params)
    original = load_file(os.path.join(folder, "model.safetensors"))
    written = load_file(os.path.join(str(tmp_path), "model.safetensors"))
    assert sorted(original) == sorted(written)
    for name, value in original.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    ref = UMT5EncoderModel.from_pretrained(str(tmp_path)).eval()
    assert ref.config.feed_forward_proj == CFG["feed_forward_proj"]


def test_random_init_saves_in_transformers_layout(tmp_path):
    module = encoder_from_dict(SMALL_CONFIGS["relu"])
    params = module.init(jax.random.key(1), np.zeros((1, 6), np.int32))["params"]
    save_text_encoder(module, params, str(tmp_path))  # boxed (partitioned) params are accepted
    _, loaded = load_text_encoder(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, loaded, nn.meta.unbox(params))


def test_tied_embedding_name_is_read(folder, tmp_path):
    def rename(config, tensors):
        tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
        return config, tensors

    _, params = load_text_encoder(_copy_with(folder, str(tmp_path), rename))
    _, want = load_text_encoder(folder)
    np.testing.assert_array_equal(params["embedding"], want["embedding"])


def test_errors_name_tensor_key_and_path(folder, tmp_path):
    def drop(config, tensors):
        tensors.pop("encoder.block.1.layer.0.SelfAttention.q.weight")
        return config, tensors

    def reshape(config, tensors):
        name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        tensors[name] = np.zeros((3, 4), np.float32)
        return config, tensors

    def no_key(config, tensors):
        config.pop("d_kv")
        return config, tensors

    with pytest.raises(ValueError, match=r"missing tensors \['encoder.block.1.layer.0.SelfAt"):
        load_text_encoder(_copy_with(folder, str(tmp_path / "a"), drop))
    with pytest.raises(ValueError, match=r"relative_attention_bias.weight: got \(3, 4\), expe"):
        load_text_encoder(_copy_with(folder, str(tmp_path / "b"), reshape))
    with pytest.raises(ValueError, match="config.json lacks 'd_kv'"):
        load_text_encoder(_copy_with(folder, str(tmp_path / "c"), no_key))
    with pytest.raises(FileNotFoundError, match="'.*nowhere' does not exist"):
        load_text_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_encoder(str(tmp_path / "empty"))


def test_bfloat16_weights_are_upcast(folder, tmp_path):
    """Wan ships its text encoder in bfloat16."""
    from safetensors.torch import save_file as save_torch_file

    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    save_torch_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()},
                    str(tmp_path / "model.safetensors"))
    _, params = load_text_encoder(str(tmp_path))
    _, want = load_text_encoder(folder)
    assert params["embedding"].dtype == np.float32
    np.testing.assert_allclose(params["embedding"], want["embedding"], rtol=1e-2)
