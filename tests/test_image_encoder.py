"""CLIP vision encoder (Wan2.1 I2V's image branch): parity with transformers on random weights,
folder round trips, errors that name the tensor/key/shape, and CLIPImageProcessor preprocessing."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from vdit.convert.wan_image import (
    load_image_encoder,
    params_from_torch,
    read_image_processor,
    save_image_encoder,
)
from vdit.models.image import encoder_from_dict, penultimate_features
from vdit.models.image_preprocess import (
    PreprocessSettings,
    preprocess,
    resize_bicubic,
    settings_from_dict,
    to_uint8,
)
from vdit.parallel.mesh import logical_rules, make_mesh

# Two small shapes: quick_gelu without projection (CLIPVisionModel), gelu with (WithProjection).
CONFIGS = {
    "quick_gelu": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=8, hidden_act="quick_gelu",
                       layer_norm_eps=1e-5),
    "gelu_proj": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, image_size=28, patch_size=7, hidden_act="gelu",
                      layer_norm_eps=1e-6, projection_dim=16),
    # a size the patch does not divide (its last 2 pixels unseen), transformers' gelu_fast
    "odd_size": dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=3, image_size=26, patch_size=6, hidden_act="gelu_fast",
                     layer_norm_eps=1e-5),
}


def rel(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


def torch_model(name: str, seed: int = 0):
    """Random transformers model; every tensor perturbed so biases and norm affines matter."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(**CONFIGS[name])
    cls = CLIPVisionModelWithProjection if "proj" in name else CLIPVisionModel
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def torch_outputs(model, pixels_nhwc: np.ndarray):
    x = torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2))
    with torch.no_grad():
        out = dict(model(x, output_hidden_states=True))
        if "image_embeds" in out:  # the WithProjection output omits the pooled state
            out["pooler_output"] = model.vision_model(x).pooler_output
    return {k: (tuple(h.numpy() for h in v) if isinstance(v, tuple) else v.numpy())
            for k, v in out.items() if v is not None}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    folder = str(tmp_path_factory.mktemp(name))
    model = torch_model(name)
    model.save_pretrained(folder)
    size = CONFIGS[name]["image_size"]
    pixels = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
    return name, folder, model, pixels, torch_outputs(model, pixels)


def test_matches_transformers(case):
    name, folder, _, pixels, ref = case
    module, params = load_image_encoder(folder)
    out = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, pixels)
    n = CONFIGS[name]["num_hidden_layers"]
    assert out.hidden_states.shape == (n + 1,) + ref["last_hidden_state"].shape
    errors = {"last_hidden_state": rel(out.last_hidden_state, ref["last_hidden_state"]),
              "pooler_output": rel(out.pooler_output, ref["pooler_output"]),
              "hidden_states[-2]": rel(out.hidden_states[-2], ref["hidden_states"][-2])}
    errors |= {f"hidden_states[{i}]": rel(out.hidden_states[i], h)
               for i, h in enumerate(ref["hidden_states"])}
    if "proj" in name:
        errors["image_embeds"] = rel(out.image_embeds, ref["image_embeds"])
    else:
        assert out.image_embeds is None
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-4, errors
    penult = penultimate_features(module, params, pixels)
    np.testing.assert_allclose(penult, out.hidden_states[-2], rtol=1e-5, atol=1e-5)
    short = jax.jit(lambda p, x: module.apply({"params": p}, x, output_hidden_states=False))(
        params, pixels)
    assert short.hidden_states is None
    np.testing.assert_allclose(short.pooler_output, out.pooler_output, rtol=1e-5, atol=1e-5)


def test_save_round_trip_and_transformers_reads_it(case, tmp_path):
    name, folder, model, pixels, ref = case
    module, params = load_image_encoder(folder)
    save_image_encoder(module, params, str(tmp_path))
    again_module, again = load_image_encoder(str(tmp_path))
    assert again_module == module
    jax.tree.map(np.testing.assert_array_equal, again, params)
    original = {k.removeprefix("vision_model."): v
                for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    written = {k.removeprefix("vision_model."): v
               for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    assert sorted(original) == sorted(written)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == [type(model).__name__]
    reread = type(model).from_pretrained(str(tmp_path)).eval()
    got = torch_outputs(reread, pixels)
    np.testing.assert_array_equal(got["last_hidden_state"], ref["last_hidden_state"])


def _boxed_and_params(name: str, batch: int):
    """Logical-axis boxes from tracing `init` (no compile: random-init compiles are slow on a
    shared CPU) and the same tree's values from a random transformers model."""
    cfg = CONFIGS[name]
    module = encoder_from_dict(cfg)
    pixels = np.zeros((batch, cfg["image_size"], cfg["image_size"], 3), np.float32)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), pixels))["params"]
    state = {k: v.numpy() for k, v in torch_model(name).state_dict().items()}
    return module, boxed, params_from_torch(module, state, "state_dict")


def test_params_carry_logical_axes_and_boxed_params_save(tmp_path):
    module, boxed, params = _boxed_and_params("gelu_proj", 1)
    specs = nn.get_partition_spec(boxed)
    assert specs["layers"]["q_proj"]["kernel"] == PartitionSpec("layers", "embed", "heads", "kv")
    assert specs["layers"]["fc1"]["kernel"] == PartitionSpec("layers", "embed", "mlp")
    assert specs["position_embedding"] == PartitionSpec(None, "embed")
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(boxed))
    assert shapes == jax.tree.map(np.shape, params)  # init and the converter agree
    is_box = lambda x: isinstance(x, nn.Partitioned)
    filled = jax.tree.map(lambda box, v: box.replace_boxed(v), boxed, params, is_leaf=is_box)
    save_image_encoder(module, filled, str(tmp_path))  # boxed params are accepted
    _, loaded = load_image_encoder(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_sharded_over_a_mesh_equals_one_device():
    module, boxed, params = _boxed_and_params("gelu_proj", 4)
    pixels = np.random.default_rng(2).standard_normal((4, 28, 28, 3)).astype(np.float32)
    fn = lambda p, x: module.apply({"params": p}, x).hidden_states[-2]
    want = jax.jit(fn)(params, pixels)
    mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), logical_rules("dit")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        sharded = jax.device_put(params, shardings)
        got = jax.jit(fn, in_shardings=(shardings, batch))(sharded, pixels)
    kernel = sharded["layers"]["fc1"]["kernel"]  # [layers, embed/fsdp, mlp/tensor]
    assert kernel.sharding.shard_shape(kernel.shape) == (3, 24, 48)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_stays_close():
    cfg = CONFIGS["gelu_proj"]
    model = torch_model("gelu_proj")
    module = encoder_from_dict(cfg, dtype="bfloat16")
    params = params_from_torch(module, {k: v.numpy() for k, v in model.state_dict().items()}, "sd")
    pixels = np.random.default_rng(5).standard_normal((2, 28, 28, 3)).astype(np.float32)
    out = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, pixels)
    ref = torch_outputs(model, pixels)
    assert out.last_hidden_state.dtype == jnp.float32 and out.image_embeds.dtype == jnp.float32
    assert rel(out.hidden_states[-2], ref["hidden_states"][-2]) < 3e-2


def _copy_with(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config, tensors = edit(config, load_file(os.path.join(src, "model.safetensors")))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_load_errors_name_the_tensor_or_key(tmp_path):
    folder = str(tmp_path / "ref")
    torch_model("gelu_proj").save_pretrained(folder)
    name = "vision_model.encoder.layers.1.self_attn.k_proj.weight"

    def reshape(config, tensors):
        tensors[name] = np.zeros((48, 40), np.float32)
        return config, tensors

    def drop(config, tensors):
        tensors.pop("vision_model.encoder.layers.2.mlp.fc1.bias")
        return config, tensors

    def extra(config, tensors):
        tensors["vision_model.encoder.layers.3.mlp.fc1.bias"] = np.zeros(96, np.float32)
        return config, tensors

    def no_key(config, tensors):
        config.pop("patch_size")
        return config, tensors

    def bad_act(config, tensors):
        return config | {"hidden_act": "swish9"}, tensors

    cases = [(reshape, r"encoder.layers.1.self_attn.k_proj.weight: got \(48, 40\), expected "
                       r"\(48, 48\)"),
             (drop, r"missing tensors \['encoder.layers.2.mlp.fc1.bias'\]"),
             (extra, r"unexpected tensors \['encoder.layers.3.mlp.fc1.bias'\]"),
             (no_key, "config.json lacks 'patch_size'"),
             (bad_act, "hidden_act='swish9' is not one of")]
    for i, (edit, pattern) in enumerate(cases):
        with pytest.raises(ValueError, match=pattern):
            load_image_encoder(_copy_with(folder, str(tmp_path / str(i)), edit))
    with pytest.raises(FileNotFoundError, match="'.*nowhere' does not exist"):
        load_image_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="model_type='clip'"):
        load_image_encoder(_copy_with(folder, str(tmp_path / "clip"),
                                      lambda c, t: (c | {"model_type": "clip"}, t)))
    module, _ = load_image_encoder(folder, with_projection=False)  # as CLIPVisionModel reads it
    assert module.projection_dim is None


def test_config_and_input_errors():
    base = CONFIGS["quick_gelu"]
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_attention_heads=4"):
        encoder_from_dict(base | {"hidden_size": 30, "num_attention_heads": 4})
    module = encoder_from_dict(base)
    with pytest.raises(ValueError, match=r"expects pixels \[B, 32, 32, 3\].*got shape \(1, 3, 32"):
        module.init(jax.random.key(0), np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(1, 28, 28, 3\)"):
        module.init(jax.random.key(0), np.zeros((1, 28, 28, 3), np.float32))
    with pytest.raises(ValueError, match="got dtype uint8"):
        module.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8))


def _smooth_image(rng, h, w):
    """A photo-like uint8 image: smooth gradients plus mild noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
    return np.clip(127.5 + 100 * base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def test_preprocess_matches_clip_image_processor(tmp_path):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc.save_pretrained(str(tmp_path))
    settings = read_image_processor(str(tmp_path))
    assert settings == settings_from_dict(proc.to_dict())
    assert (settings.shortest_edge, settings.crop_height) == (28, 28)
    rng = np.random.default_rng(3)
    # Landscape, upscales, square, and portrait downscales (where Pillow 13 runs its vertical
    # pass first); noise images too, whose uint8 rounding between the passes shows any order slip.
    for h, w in [(60, 97), (45, 45), (20, 33), (16, 12), (150, 61), (122, 50)]:
        for img in (_smooth_image(rng, h, w), rng.integers(0, 256, (h, w, 3), dtype=np.uint8)):
            want = proc(images=img, return_tensors="np", input_data_format="channels_last")
            got = preprocess(img, settings)
            np.testing.assert_array_equal(got, want["pixel_values"].transpose(0, 2, 3, 1))


def test_preprocess_to_an_exact_size_with_another_filter_matches(tmp_path):
    """`size` as {"height", "width"} resizes to exactly that; `resample` picks Pillow's filter."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"height": 30, "width": 26}, crop_size={"height": 24, "width": 20},
                              resample=2, do_center_crop=True)
    settings = settings_from_dict(proc.to_dict())
    rng = np.random.default_rng(5)
    for h, w in [(60, 97), (16, 12)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = proc(images=img, return_tensors="np", input_data_format="channels_last")
        np.testing.assert_array_equal(preprocess(img, settings),
                                      want["pixel_values"].transpose(0, 2, 3, 1))


def test_resize_equals_pillow_bicubic():
    from PIL import Image

    rng = np.random.default_rng(4)
    for (h, w), (oh, ow) in [((48, 80), (48, 31)), ((48, 80), (21, 80)), ((9, 14), (30, 44)),
                             ((480, 832), (224, 388)), ((832, 480), (388, 224)),
                             ((115, 63), (87, 59)), ((122, 50), (78, 32))]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(img).resize((ow, oh), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(resize_bicubic(img, (oh, ow)), want)


def test_preprocess_then_encode_matches_transformers():
    from transformers import CLIPImageProcessor

    model = torch_model("quick_gelu")
    module = encoder_from_dict(CONFIGS["quick_gelu"])
    params = params_from_torch(module, {k: v.numpy() for k, v in model.state_dict().items()},
                               "state_dict")
    images = [_smooth_image(np.random.default_rng(i), 40, 70 + i) for i in range(2)]
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    inputs = proc(images=images, return_tensors="pt", input_data_format="channels_last")
    with torch.no_grad():
        want = model(**inputs, output_hidden_states=True).hidden_states[-2].numpy()
    pixels = preprocess(images, settings_from_dict(proc.to_dict()))
    assert rel(penultimate_features(module, params, pixels), want) < 1e-4


def test_preprocess_input_checks_and_to_uint8():
    with pytest.raises(ValueError, match=r"image 0: expected uint8 \[H, W, 3\].*float32"):
        preprocess(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"image 1: .*shape \(8, 8, 4\)"):
        preprocess([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 4), np.uint8)])
    with pytest.raises(ValueError, match="crop 40x40 is larger than the resized image 32x32"):
        preprocess(np.zeros((8, 8, 3), np.uint8),
                   PreprocessSettings(shortest_edge=32, crop_height=40, crop_width=40))
    with pytest.raises(ValueError, match="resample=9 is not a Pillow filter"):
        settings_from_dict({"resample": 9})
    batch = preprocess(np.zeros((3, 10, 12, 3), np.uint8), PreprocessSettings(8, 8, 8))
    assert batch.shape == (3, 8, 8, 3) and batch.dtype == np.float32
    x = np.array([-1.0, -0.5, 0.0, 0.999, 1.5], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 64, 128, 255, 255])
