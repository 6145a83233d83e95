"""transformers `UMT5EncoderModel` folders <-> vdit's `UMT5Encoder` (module, params), both ways.

Torch layout -> ours: Linear weights [out, in] become kernels [in, out], with attention heads split
out (q/k/v [D, H, d_kv], o [H, d_kv, D]); the per-block tensors are stacked along a leading
`layers` axis to match `nn.scan`. The token table is `shared.weight` (transformers ties
`encoder.embed_tokens.weight` to it; either name is read). A T5EncoderModel folder (T5 shares
block 0's relative-position table across layers, as diffusers' Wan pipeline tests use) loads too:
its table is copied into every layer, which computes the same, and it saves back as UMT5.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from vdit.convert.safetensors_io import (
    check_names_and_shapes,
    read_config,
    read_tensors,
    write_folder,
)
from vdit.models.text import CONFIG_FIELDS, UMT5Encoder, encoder_from_dict, parse_feed_forward_proj

WEIGHTS_NAME = "model.safetensors"
_BLOCK = "encoder.block.{i}.layer."


def _ffn_names(module: UMT5Encoder) -> tuple[str, ...]:
    gated, _ = parse_feed_forward_proj(module.feed_forward_proj)
    return ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")


def is_t5(config: dict) -> bool:
    """A transformers T5 (not UMT5) encoder config: one relative-position table, in block 0."""
    return config.get("model_type") == "t5" or "T5EncoderModel" in config.get("architectures", [])


def torch_shapes(module: UMT5Encoder, shared_bias: bool = False) -> dict[str, tuple]:
    """Every tensor name of the transformers checkpoint -> its shape (`shared_bias`: T5's)."""
    d, inner, f = module.d_model, module.num_heads * module.d_kv, module.d_ff
    shapes = {"shared.weight": (module.vocab_size, d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(module.num_layers):
        p = _BLOCK.format(i=i)
        for name in ("q", "k", "v"):
            shapes[f"{p}0.SelfAttention.{name}.weight"] = (inner, d)
        shapes[f"{p}0.SelfAttention.o.weight"] = (d, inner)
        if i == 0 or not shared_bias:
            shapes[f"{p}0.SelfAttention.relative_attention_bias.weight"] = (
                module.relative_attention_num_buckets, module.num_heads)
        shapes[f"{p}0.layer_norm.weight"] = (d,)
        shapes[f"{p}1.layer_norm.weight"] = (d,)
        for name in _ffn_names(module):
            shapes[f"{p}1.DenseReluDense.{name}.weight"] = (d, f) if name == "wo" else (f, d)
    return shapes


def params_from_torch(module: UMT5Encoder, tensors: dict[str, np.ndarray], where: str,
                      shared_bias: bool = False) -> dict:
    """transformers tensors -> our params pytree; errors name each missing/extra/mis-shaped one.
    `shared_bias`: a T5 checkpoint, block 0's relative-position table used by every layer."""
    tensors = dict(tensors)
    tied = tensors.pop("encoder.embed_tokens.weight", None)
    if tied is not None and "shared.weight" not in tensors:
        tensors["shared.weight"] = tied
    check_names_and_shapes(tensors, torch_shapes(module, shared_bias), where)
    bias = "0.SelfAttention.relative_attention_bias.weight"
    if shared_bias:
        tensors |= {_BLOCK.format(i=i) + bias: tensors[_BLOCK.format(i=0) + bias]
                    for i in range(1, module.num_layers)}
    h, k = module.num_heads, module.d_kv

    def stack(fn):
        return np.stack([fn(_BLOCK.format(i=i)) for i in range(module.num_layers)])

    def heads_in(name):  # [H*k, D] -> [D, H, k]
        return stack(lambda p: tensors[p + name].T.reshape(-1, h, k))

    attn = {n: {"kernel": heads_in(f"0.SelfAttention.{n}.weight")} for n in ("q", "k", "v")}
    attn["o"] = {"kernel": stack(lambda p: tensors[p + "0.SelfAttention.o.weight"].T
                                 .reshape(h, k, -1))}
    attn["relative_bias"] = stack(lambda p: tensors[p + bias])
    ffn = {n: {"kernel": stack(lambda p, n=n: tensors[f"{p}1.DenseReluDense.{n}.weight"].T)}
           for n in _ffn_names(module)}
    layers = {
        "attn_norm": {"scale": stack(lambda p: tensors[p + "0.layer_norm.weight"])},
        "attn": attn,
        "ffn_norm": {"scale": stack(lambda p: tensors[p + "1.layer_norm.weight"])},
        "ffn": ffn,
    }
    params = {"embedding": tensors["shared.weight"], "layers": layers,
              "final_norm": {"scale": tensors["encoder.final_layer_norm.weight"]}}
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)  # as the DiT's and VAE's


def params_to_torch(module: UMT5Encoder, params) -> dict[str, np.ndarray]:
    """Our params pytree -> transformers tensor names and layouts (float32)."""
    params = nn.meta.unbox(params)
    lay = params["layers"]
    out = {"shared.weight": np.asarray(params["embedding"], np.float32),
           "encoder.final_layer_norm.weight": np.asarray(params["final_norm"]["scale"])}
    for i in range(module.num_layers):
        p = _BLOCK.format(i=i)
        for n in ("q", "k", "v"):
            kern = np.asarray(lay["attn"][n]["kernel"][i])
            out[f"{p}0.SelfAttention.{n}.weight"] = kern.reshape(kern.shape[0], -1).T
        o = np.asarray(lay["attn"]["o"]["kernel"][i])
        out[f"{p}0.SelfAttention.o.weight"] = o.reshape(-1, o.shape[-1]).T
        out[f"{p}0.SelfAttention.relative_attention_bias.weight"] = np.asarray(
            lay["attn"]["relative_bias"][i])
        out[f"{p}0.layer_norm.weight"] = np.asarray(lay["attn_norm"]["scale"][i])
        out[f"{p}1.layer_norm.weight"] = np.asarray(lay["ffn_norm"]["scale"][i])
        for n in _ffn_names(module):
            out[f"{p}1.DenseReluDense.{n}.weight"] = np.asarray(lay["ffn"][n]["kernel"][i]).T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def load_text_encoder(path: str, dtype="float32") -> tuple[UMT5Encoder, dict]:
    """A transformers UMT5EncoderModel (or T5EncoderModel) folder (config.json + safetensors)
    -> (module, params)."""
    config = read_config(path)
    module = encoder_from_dict(config, dtype, where=f"{path}/config.json")
    return module, params_from_torch(module, read_tensors(path), path, is_t5(config))


def save_text_encoder(module: UMT5Encoder, params, out_dir: str) -> None:
    """Writes a folder that transformers' `UMT5EncoderModel.from_pretrained` reads."""
    config = {f: getattr(module, f) for f in CONFIG_FIELDS}
    config |= {"architectures": ["UMT5EncoderModel"], "model_type": "umt5"}
    write_folder(out_dir, config, params_to_torch(module, params), weights_name=WEIGHTS_NAME)
