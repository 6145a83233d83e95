"""transformers `CLIPVisionModel(WithProjection)` folders <-> vdit's `CLIPVisionEncoder`, both ways.

Torch layout -> ours: Linear weights [out, in] become kernels [in, out], with attention heads split
out (q/k/v [D, H, Dh] + bias [H, Dh]; out_proj [H, Dh, D]); the patch conv [D, C, p, p] becomes a
kernel [p, p, C, D] over channels-last patches; per-layer tensors are stacked along a leading
`layers` axis to match `nn.scan`. Tensor names may carry the `vision_model.` prefix (the Hub and
Wan2.1's `image_encoder/` layout, and what we write) or not (transformers 5's `CLIPVisionModel`);
the non-learned `embeddings.position_ids` buffer of old checkpoints is ignored. A
`visual_projection.weight` makes the module a `...WithProjection` (its `image_embeds`).
`read_image_processor` reads the folder's CLIPImageProcessor settings (preprocessor_config.json).
"""

from __future__ import annotations

import json

import flax.linen as nn
import numpy as np

from vdit import runs
from vdit.convert.safetensors_io import (
    check_names_and_shapes,
    read_config,
    read_tensors,
    write_folder,
)
from vdit.models.image import CONFIG_FIELDS, CLIPVisionEncoder, encoder_from_dict
from vdit.models.image_preprocess import PreprocessSettings, settings_from_dict

WEIGHTS_NAME = "model.safetensors"
PREFIX = "vision_model."
PROJECTION = "visual_projection.weight"
_LAYER = "encoder.layers.{i}."
_IGNORED = ("embeddings.position_ids",)


def torch_shapes(module: CLIPVisionEncoder) -> dict[str, tuple]:
    """Every tensor name (without the `vision_model.` prefix) -> its shape."""
    d, f, p, c = module.hidden_size, module.intermediate_size, module.patch_size, module.num_channels
    shapes = {"embeddings.class_embedding": (d,),
              "embeddings.patch_embedding.weight": (d, c, p, p),
              "embeddings.position_embedding.weight": (module.num_positions, d)}
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes |= {f"{norm}.weight": (d,), f"{norm}.bias": (d,)}
    for i in range(module.num_hidden_layers):
        pre = _LAYER.format(i=i)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{pre}self_attn.{name}.weight": (d, d), f"{pre}self_attn.{name}.bias": (d,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{pre}{norm}.weight": (d,), f"{pre}{norm}.bias": (d,)}
        shapes |= {f"{pre}mlp.fc1.weight": (f, d), f"{pre}mlp.fc1.bias": (f,),
                   f"{pre}mlp.fc2.weight": (d, f), f"{pre}mlp.fc2.bias": (d,)}
    if module.projection_dim is not None:
        shapes[PROJECTION] = (module.projection_dim, d)
    return shapes


def _strip_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        key = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if key in out:
            raise ValueError(f"tensor {key!r} appears both with and without the {PREFIX!r} prefix")
        if key not in _IGNORED:
            out[key] = value
    return out


def params_from_torch(module: CLIPVisionEncoder, tensors: dict[str, np.ndarray],
                      where: str) -> dict:
    """transformers tensors -> our params pytree; errors name each missing/extra/mis-shaped one."""
    t = _strip_prefix(tensors)
    check_names_and_shapes(t, torch_shapes(module), where)
    h = module.num_attention_heads
    d = module.hidden_size

    def stack(suffix, fn=lambda x: x):
        return np.stack([fn(t[_LAYER.format(i=i) + suffix])
                         for i in range(module.num_hidden_layers)]).astype(np.float32)

    def norm(prefix, stacked=True):
        get = (lambda s: stack(prefix + s)) if stacked else (lambda s: t[prefix + s])
        return {"scale": get(".weight"), "bias": get(".bias")}

    layer = {"layer_norm1": norm("layer_norm1"), "layer_norm2": norm("layer_norm2")}
    for name in ("q_proj", "k_proj", "v_proj"):
        layer[name] = {"kernel": stack(f"self_attn.{name}.weight", lambda w: w.T.reshape(d, h, -1)),
                       "bias": stack(f"self_attn.{name}.bias", lambda b: b.reshape(h, -1))}
    layer["out_proj"] = {"kernel": stack("self_attn.out_proj.weight",
                                         lambda w: w.T.reshape(h, -1, d)),
                         "bias": stack("self_attn.out_proj.bias")}
    for name in ("fc1", "fc2"):
        layer[name] = {"kernel": stack(f"mlp.{name}.weight", lambda w: w.T),
                       "bias": stack(f"mlp.{name}.bias")}
    params = {
        "patch_embedding": {"kernel": t["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)},
        "class_embedding": t["embeddings.class_embedding"],
        "position_embedding": t["embeddings.position_embedding.weight"],
        "pre_layernorm": norm("pre_layrnorm", stacked=False),
        "layers": layer,
        "post_layernorm": norm("post_layernorm", stacked=False),
    }
    if module.projection_dim is not None:
        params["visual_projection"] = {"kernel": t[PROJECTION].T}
    return _float32_tree(params)


def _float32_tree(tree):
    if isinstance(tree, dict):
        return {k: _float32_tree(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, np.float32)


def params_to_torch(module: CLIPVisionEncoder, params) -> dict[str, np.ndarray]:
    """Our params pytree -> transformers names (with the `vision_model.` prefix) and layouts."""
    p = nn.meta.unbox(params)
    lay = {k: {n: np.asarray(v) for n, v in sub.items()} for k, sub in p["layers"].items()}
    d = module.hidden_size
    out = {
        "embeddings.class_embedding": p["class_embedding"],
        "embeddings.patch_embedding.weight":
            np.asarray(p["patch_embedding"]["kernel"]).transpose(3, 2, 0, 1),
        "embeddings.position_embedding.weight": p["position_embedding"],
    }
    for ours, theirs in (("pre_layernorm", "pre_layrnorm"), ("post_layernorm", "post_layernorm")):
        out |= {f"{theirs}.weight": p[ours]["scale"], f"{theirs}.bias": p[ours]["bias"]}
    for i in range(module.num_hidden_layers):
        pre = _LAYER.format(i=i)
        for name in ("q_proj", "k_proj", "v_proj"):
            out[f"{pre}self_attn.{name}.weight"] = lay[name]["kernel"][i].reshape(d, d).T
            out[f"{pre}self_attn.{name}.bias"] = lay[name]["bias"][i].reshape(d)
        out[f"{pre}self_attn.out_proj.weight"] = lay["out_proj"]["kernel"][i].reshape(d, d).T
        out[f"{pre}self_attn.out_proj.bias"] = lay["out_proj"]["bias"][i]
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{pre}{norm}.weight"] = lay[norm]["scale"][i]
            out[f"{pre}{norm}.bias"] = lay[norm]["bias"][i]
        for name in ("fc1", "fc2"):
            out[f"{pre}mlp.{name}.weight"] = lay[name]["kernel"][i].T
            out[f"{pre}mlp.{name}.bias"] = lay[name]["bias"][i]
    out = {PREFIX + k: v for k, v in out.items()}
    if module.projection_dim is not None:
        out[PROJECTION] = np.asarray(p["visual_projection"]["kernel"]).T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def load_image_encoder(path: str, dtype="float32", attention: str = "xla",
                       with_projection: bool | None = None) -> tuple[CLIPVisionEncoder, dict]:
    """A transformers CLIPVisionModel(WithProjection) folder -> (module, params).

    `with_projection=None` keeps `visual_projection` when the folder has it; False drops it
    (as `CLIPVisionModel.from_pretrained` does); True requires it.
    """
    where = f"{path}/config.json"
    config = read_config(path)
    if config.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"{where}: model_type={config['model_type']!r}; expected "
                         "'clip_vision_model' (a CLIPVisionModel or ...WithProjection folder)")
    tensors = read_tensors(path)
    has_projection = PROJECTION in tensors
    if with_projection and not has_projection:
        raise ValueError(f"{path}: with_projection=True but the weights lack {PROJECTION!r}")
    keep = has_projection if with_projection is None else with_projection
    if not keep:
        tensors.pop(PROJECTION, None)
    proj = int(tensors[PROJECTION].shape[0]) if keep else None
    module = encoder_from_dict(config, dtype, where, projection_dim=proj, attention=attention)
    return module, params_from_torch(module, tensors, path)


def save_image_encoder(module: CLIPVisionEncoder, params, out_dir: str) -> None:
    """Writes a folder that transformers' `CLIPVisionModel(WithProjection).from_pretrained` reads."""
    config = {f: getattr(module, f) for f in CONFIG_FIELDS}
    arch = "CLIPVisionModel"
    if module.projection_dim is not None:
        config["projection_dim"] = module.projection_dim
        arch = "CLIPVisionModelWithProjection"
    config |= {"architectures": [arch], "model_type": "clip_vision_model"}
    write_folder(out_dir, config, params_to_torch(module, params), weights_name=WEIGHTS_NAME)


def read_image_processor(path: str) -> PreprocessSettings:
    """The CLIPImageProcessor settings of a folder (its preprocessor_config.json)."""
    file = runs.user_path(path) / "preprocessor_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no preprocessor_config.json in {path!r} (expected {file})")
    return settings_from_dict(json.loads(file.read_text()), where=str(file))
