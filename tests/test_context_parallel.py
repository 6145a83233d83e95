"""Sequence (context) parallelism on 8 fake CPU devices: the token axis sharded over `sequence`,
self-attention by Ulysses all-to-all (or all-gathered k/v when heads do not divide), equal to one
device for the attention op alone and for the DiT's packed loss and gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dit_testing import pack_row, tiny_model_config
from jax.sharding import NamedSharding, PartitionSpec

from vdit.models.attention import local_attention, xla_attention
from vdit.models.dit import build_dit
from vdit.parallel import context
from vdit.parallel.mesh import logical_rules, make_mesh

# The per-device kernel the sequence-parallel schedules run (what models.attention passes).
XLA = functools.partial(local_attention, backend="xla", shard=False)

RULES = logical_rules("dit")


def _qkv(b=2, s=16, h=4, d=8):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(b, s, h, d)).astype(np.float32) for _ in range(3))
    seg = np.stack([np.repeat([1, 2, 0], [7, 5, 4]), np.repeat([1, 2, 3], [3, 9, 4])]).astype(
        np.int32)
    return q, k, v, seg


@pytest.mark.parametrize("schedule", context.SCHEDULES)
def test_attention_op_matches_one_device(schedule):
    q, k, v, seg = _qkv()
    mesh = make_mesh({"data": 2, "sequence": 4})

    def loss(fn, q, k, v):
        out = fn(q, k, v, seg, seg)
        return jnp.sum(out * jnp.cos(out)), out

    sp = lambda *a: context.sequence_parallel_attention(*a, XLA, schedule=schedule)
    want = jax.value_and_grad(lambda *a: loss(xla_attention, *a), argnums=(0, 1, 2),
                              has_aux=True)(q, k, v)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        assert context.sequence_parallel_size() == 4
        got = jax.jit(jax.value_and_grad(lambda *a: loss(sp, *a), argnums=(0, 1, 2),
                                         has_aux=True))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_rows_and_heads_that_do_not_divide_stay_whole():
    q, k, v, seg = _qkv(b=1, h=3)  # 1 row over data=2; 3 heads over 4: all-gathered k/v
    want = xla_attention(q, k, v, seg[:1], seg[:1])
    with jax.set_mesh(make_mesh({"data": 2, "sequence": 4})), nn.logical_axis_rules(RULES):
        got = jax.jit(lambda *a: context.sequence_parallel_attention(*a, XLA))(
            q, k, v, seg[:1], seg[:1])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_schedule_choice_and_errors():
    assert context.pick_schedule(40, 1, 8) == "ulysses"
    assert context.pick_schedule(12, 1, 8) == "allgather_kv"
    assert context.pick_schedule(8, 2, 4) == "ulysses"
    with pytest.raises(ValueError, match="12 attention heads cannot be split over 8"):
        context.pick_schedule(12, 8, 1)
    q, k, v, seg = _qkv()
    with jax.set_mesh(make_mesh({"data": 2, "sequence": 4})), nn.logical_axis_rules(RULES):
        with pytest.raises(ValueError, match="14 tokens per row .* 4 devices .*mesh.sequence"):
            cut = lambda x: x[:, :14]
            context.sequence_parallel_attention(cut(q), cut(k), cut(v), cut(seg), cut(seg), XLA)
        with pytest.raises(ValueError, match="ulysses needs per-device heads"):
            context.sequence_parallel_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :],
                                                seg, seg, XLA, "ulysses")
    assert context.sequence_parallel_size() == 1  # no mesh in context


@pytest.fixture(scope="module")
def dit_setup():
    model = build_dit(tiny_model_config(num_attention_heads=4, num_layers=1))  # dim 48
    rng = np.random.default_rng(1)
    rows = []
    for b in range(2):  # 2 rows of 2 videos each, packed to 32 tokens (8 per device at P=4)
        shapes = [(1 + b, 2, 4), (2, 2, 2 + 2 * b)]
        videos = [rng.normal(size=s + (4,)).astype(np.float32) for s in shapes]
        texts = [rng.normal(size=(3, 16)).astype(np.float32) for _ in shapes]
        rows.append(pack_row(videos, texts, [300.0 * b + 7, 650.0], (1, 2, 2), seq_len=32,
                             text_len=8)[:6])
    batch = [np.stack(parts) for parts in zip(*rows, strict=True)]
    target = rng.normal(size=batch[0].shape).astype(np.float32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *batch, method="packed"))
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *batch,
                                                  method="packed")))()["params"]

    def loss(p, *b):
        out = model.apply({"params": p}, *b, method="packed")
        real = (b[2] > 0)[..., None]
        return jnp.sum(jnp.where(real, (out - target) ** 2, 0.0)) / jnp.sum(real)

    want = jax.jit(jax.value_and_grad(loss))(params, *batch)
    return loss, boxed, params, batch, want


def _sharded_loss_and_grads(setup, sizes):
    loss, boxed, params, batch, _ = setup
    mesh = make_mesh(sizes)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        p_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)["params"]
        row_spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length"))
        data = [NamedSharding(mesh, PartitionSpec(*row_spec[: min(2, x.ndim)])) for x in batch[:3]]
        data += [NamedSharding(mesh, PartitionSpec(row_spec[0])) for _ in batch[3:]]
        fn = jax.jit(jax.value_and_grad(loss), in_shardings=(p_sh, *data))
        compiled = fn.lower(params, *batch).compile()
        return compiled(jax.device_put(params, p_sh), *batch), compiled.as_text()


@pytest.mark.parametrize("sizes,schedule", [
    ({"data": 2, "sequence": 4}, "ulysses"),
    ({"tensor": 2, "sequence": 4}, "allgather_kv"),  # 4 heads / tensor 2 do not split over 4
], ids=["data2_seq4_ulysses", "tensor2_seq4_allgather"])
def test_dit_loss_and_grads_match_one_device(dit_setup, sizes, schedule):
    (got_loss, got_grads), hlo = _sharded_loss_and_grads(dit_setup, sizes)
    want_loss, want_grads = dit_setup[-1]
    assert ("all-to-all" in hlo) == (schedule == "ulysses")
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    flat_got = jax.tree_util.tree_leaves_with_path(got_grads)
    for (path, g), w in zip(flat_got, jax.tree.leaves(want_grads), strict=True):
        err = np.linalg.norm(np.asarray(g) - np.asarray(w)) / (np.linalg.norm(w) + 1e-12)
        assert err < 1e-4, (jax.tree_util.keystr(path), err)
