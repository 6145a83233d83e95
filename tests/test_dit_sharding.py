"""The DiT on 8 fake CPU devices: parameters sharded by their logical names and activations
constrained, under (data=8), (fsdp=8) and (data=2, fsdp=2, tensor=2), equal one device."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from dit_testing import pack_row, tiny_model_config
from jax.sharding import NamedSharding, PartitionSpec

from vdit.models.dit import build_dit
from vdit.parallel.mesh import DIT_RULES, logical_rules, logical_to_mesh_spec, make_mesh

MESHES = [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]


@pytest.fixture(scope="module")
def setup():
    model = build_dit(tiny_model_config())
    rng = np.random.default_rng(0)
    rows = []
    for b in range(8):  # 8 rows of 1-2 segments each, padded to 24 tokens / 8 text tokens
        shapes = [(1 + b % 3, 2, 4), (2, 2, 2)][: 1 + b % 2]
        videos = [rng.normal(size=s + (4,)).astype(np.float32) for s in shapes]
        texts = [rng.normal(size=(3, 16)).astype(np.float32) for _ in shapes]
        rows.append(pack_row(videos, texts, [100.0 * b + 5, 42.0][: len(shapes)] + [0.0] * (
            2 - len(shapes)), (1, 2, 2), seq_len=24, text_len=8)[:6])
    batch = [np.stack(parts) for parts in zip(*rows, strict=True)]
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *batch, method="packed"))
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *batch,
                                                  method="packed")))()["params"]
    fn = lambda p, *b: model.apply({"params": p}, *b, method="packed")
    return fn, boxed, params, batch, jax.jit(fn)(params, *batch)


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sharded_equals_single_device(setup, sizes):
    fn, boxed, params, batch, want = setup
    mesh = make_mesh(sizes)
    rules = logical_rules("dit")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        param_sharding = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                                     rules)["params"]
        batch_spec = nn.logical_to_mesh_axes(("activation_batch",))
        data = [NamedSharding(mesh, PartitionSpec(*batch_spec, *([None] * (x.ndim - 1))))
                for x in batch]
        sharded = jax.device_put(params, param_sharding)
        got = jax.jit(fn, in_shardings=(param_sharding, *data), out_shardings=data[0])(
            sharded, *batch)
    if "fsdp" in sizes:  # the weights really are split
        kernel = sharded["blocks"]["attn1"]["to_q"]["kernel"]
        assert kernel.sharding.shard_shape(kernel.shape)[1] == kernel.shape[1] // sizes["fsdp"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_a_logical_axis_without_a_rule_is_an_error():
    assert logical_to_mesh_spec(("embed", "mlp"), DIT_RULES) == PartitionSpec("fsdp", "tensor")
    assert logical_to_mesh_spec(("embed", None), DIT_RULES) == PartitionSpec("fsdp", None)
    with pytest.raises(ValueError, match="logical axis 'embd' has no sharding rule"):
        logical_to_mesh_spec(("embd", "mlp"), DIT_RULES)
