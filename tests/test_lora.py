"""LoRA: adapters merge exactly (stacked layers, multi-axis kernels), start as a no-op and match
an unmerged forward; a LoRA run trains only adapters against the frozen init_from base; sampling
and `vdit export` see base + adapters; bad settings fail with the key named."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P
from train_testing import VIDEOS, tiny_config, train_tiny, write_shards

from vdit import cli
from vdit.models import lora
from vdit.models.vae_config import vae_from_config
from vdit.parallel.mesh import DIT_RULES, logical_to_mesh_spec
from vdit.pipelines.generate import Generator
from vdit.runs import checkpoint
from vdit.train import init_from, loop, run_params

TARGETS = [r"blocks/attn[12]/to_(q|k|v|out)/kernel$", r"blocks/ffn/linear_[12]/kernel$",
           r"^time_proj/kernel$"]


def _cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(enabled=True, rank=3, alpha=6.0, targets=TARGETS) | kw)


def _model(num_layers: int):
    """(dit, boxed abstract params, random base params): shapes only, nothing compiled. Matmuls
    in float32: the merged and unmerged paths must agree to 1e-5, below bfloat16's rounding."""
    config = tiny_config("shapes_dit", "unused", f"--config.model.num_layers={num_layers}",
                         "--config.model.matmul_dtype=")
    dit, text_model, _ = run_params.build_models(config)
    boxed = jax.eval_shape(lambda r: run_params.init_params(dit, text_model, config, r)["dit"],
                           jax.random.key(0))
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32),
                        nn.meta.unbox(boxed))
    return dit, boxed, base


def _apply(dit, params, x, interceptor=None):
    def run(p, latents, t, context):
        if interceptor is None:
            return dit.apply({"params": p}, latents, t, context)
        with nn.intercept_methods(interceptor):
            return dit.apply({"params": p}, latents, t, context)

    return np.asarray(jax.jit(run)(params, *x))


def _random_adapters(boxed, cfg, seed=1):
    adapters = nn.meta.unbox(lora.init_adapters(jax.random.key(seed), boxed, cfg))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, jnp.float32),
                        adapters)


def _inputs(dit):
    latents = jax.random.normal(jax.random.key(5), (2, 2, 4, 4, dit.in_channels))
    context = jax.random.normal(jax.random.key(6), (2, 3, dit.text_dim))
    return latents, jnp.array([100.0, 700.0]), context


def test_merge_matches_a_per_layer_reference():
    _, boxed, base = _model(num_layers=2)
    cfg = _cfg()
    adapters = _random_adapters(boxed, cfg)
    merged = traverse_util.flatten_dict(lora.merge_lora(base, adapters, cfg))
    flat_base = traverse_util.flatten_dict(base)
    factors = traverse_util.flatten_dict(adapters)
    targets = {k[:-1] for k in factors}
    assert len(targets) == 2 * 4 + 2 + 1
    for key, kernel in flat_base.items():
        if key not in targets:
            assert merged[key] is kernel
            continue
        kernel = np.asarray(kernel, np.float64)
        a, b = np.asarray(factors[key + ("a",)]), np.asarray(factors[key + ("b",)])
        layered = key[0] == "blocks"
        want = np.empty_like(kernel)
        for i in range(kernel.shape[0] if layered else 1):
            k, ai, bi = (kernel[i], a[i], b[i]) if layered else (kernel, a, b)
            n_in = 2 if key[-2] == "to_out" else 1
            delta = ai.reshape(math.prod(k.shape[:n_in]), -1) @ bi.reshape(bi.shape[0], -1)
            out = k + delta.reshape(k.shape) * (6.0 / 3)
            if layered:
                want[i] = out
            else:
                want = out
        np.testing.assert_allclose(merged[key], want, rtol=1e-5, atol=1e-6)


def test_adapters_shard_like_their_kernels():
    _, boxed, _ = _model(num_layers=2)
    adapters = jax.eval_shape(lambda: lora.init_adapters(jax.random.key(0), boxed, _cfg()))
    specs = traverse_util.flatten_dict(nn.get_partition_spec(adapters), sep="/")
    spec = lambda key: logical_to_mesh_spec(specs[key], DIT_RULES)
    assert spec("blocks/attn1/to_q/kernel/a") == P(None, "fsdp", None)
    assert spec("blocks/attn1/to_q/kernel/b") == P(None, None, "tensor", None)
    assert spec("blocks/attn2/to_out/kernel/a") == P(None, "tensor", None, None)
    assert spec("blocks/ffn/linear_1/kernel/b") == P(None, None, "tensor")
    assert spec("time_proj/kernel/b") == P(None, None, "fsdp")


def test_fresh_adapters_leave_the_model_exactly_as_it_was():
    dit, boxed, base = _model(num_layers=2)
    cfg = _cfg()
    adapters = nn.meta.unbox(lora.init_adapters(jax.random.key(3), boxed, cfg))
    assert all(not np.any(b) for k, b in traverse_util.flatten_dict(adapters).items() if k[-1] == "b")
    merged = lora.merge_lora(base, adapters, cfg)
    jax.tree.map(np.testing.assert_array_equal, merged, base)
    x = _inputs(dit)
    np.testing.assert_array_equal(_apply(dit, merged, x), _apply(dit, base, x))


def test_merged_model_equals_base_plus_adapter_path():
    """The merged forward equals the base forward with x @ A @ B * alpha/rank added to every
    targeted Dense output (computed unmerged, by intercepting the Dense calls)."""
    dit, boxed, base = _model(num_layers=1)
    cfg = _cfg()
    adapters = _random_adapters(boxed, cfg)
    flat = traverse_util.flatten_dict(adapters)
    hits = []

    def add_adapter_path(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        key = tuple(module.path) + ("kernel",)
        if context.method_name != "__call__" or key + ("a",) not in flat:
            return out
        a, b = flat[key + ("a",)], flat[key + ("b",)]
        if key[0] == "blocks":  # one scanned layer
            a, b = a[0], b[0]
        h = jnp.tensordot(args[0], a, axes=module.in_dims)
        hits.append(key)
        return out + jnp.tensordot(h, b, axes=1) * lora.scale(cfg)

    x = _inputs(dit)
    merged_out = _apply(dit, lora.merge_lora(base, adapters, cfg), x)
    unmerged_out = _apply(dit, base, x, add_adapter_path)
    assert len(set(hits)) == 11
    assert np.max(np.abs(merged_out - _apply(dit, base, x))) > 1e-2
    np.testing.assert_allclose(merged_out, unmerged_out, rtol=1e-5, atol=1e-5)


def test_bad_lora_settings_fail_naming_the_key(tmp_path):
    config = tiny_config("shapes_lora", str(tmp_path), "--config.train.init_from=")
    with pytest.raises(ValueError, match=r"'lora\.enabled' = True needs 'train\.init_from'"):
        loop.train(config, str(tmp_path))
    base = tiny_config("shapes_lora", str(tmp_path))
    for key, value, match in (("rank", 0, r"lora\.rank' = 0"), ("alpha", -1.0, r"lora\.alpha"),
                              ("targets", ["to_q("], r"not a valid regex"),
                              ("targets", [], r"non-empty list")):
        config = tiny_config("shapes_lora", str(tmp_path))
        config.lora[key] = value
        with pytest.raises(ValueError, match=match):
            lora.check_config(config)
    _, boxed, _ = _model(num_layers=1)
    with pytest.raises(ValueError, match=r"'blocks/attn3/to_q' matches no DiT kernel"):
        lora.init_adapters(jax.random.key(0), boxed, _cfg(targets=["blocks/attn3/to_q"]))
    assert lora.enabled(base) and not lora.enabled(tiny_config("shapes_dit", str(tmp_path)))


def _write_vae_run(workdir: str, config) -> None:
    """A random VAE saved as a run's EMA weights (what encode.vae_workdir points at)."""
    vae = vae_from_config(config.vae)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(vae.init(jax.random.key(0),
                                                           jnp.zeros((1, 1, 4, 4, 3))))["params"])
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    manager = checkpoint.make_manager(workdir, config.checkpoint, with_data=False)
    checkpoint.save(manager, 1, {"ema": params}, config)
    manager.wait_until_finished()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    latents = write_shards(str(root / "latents"), VIDEOS)
    with open(os.path.join(latents, "stats.json"), "w") as f:
        json.dump({"mean": [0.0] * 8, "std": [1.0] * 8}, f)
    vae = str(root / "vae")
    _write_vae_run(vae, tiny_config("shapes_dit", latents))
    base = str(root / "base")
    train_tiny("shapes_dit", base, latents, 2, f"--config.encode.vae_workdir={vae}")
    base_before, _ = init_from.run_weights(base, "params")  # complete: dit + (frozen) text
    run = str(root / "run")
    # The adapters train on a mesh with fsdp and tensor axes (the base trained on data only).
    extra = (f"--config.train.init_from={base}", f"--config.encode.vae_workdir={vae}",
             "--config.lora.rank=2", "--config.mesh.data=2", "--config.mesh.fsdp=2",
             "--config.mesh.tensor=2")
    history = train_tiny("shapes_lora", run, latents, 2, *extra)
    return {"root": root, "latents": latents, "base": base, "run": run, "history": history,
            "base_before": base_before, "extra": extra}


def test_lora_run_trains_only_adapters(runs):
    assert [h["step"] for h in runs["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in runs["history"])
    base_after, _ = init_from.run_weights(runs["base"], "params")
    jax.tree.map(np.testing.assert_array_equal, base_after, runs["base_before"])

    trained, saved = checkpoint.load_params(runs["run"], "params")
    assert set(trained) == {"lora"}
    config = ml_collections.ConfigDict(saved)
    dit, text_model, _ = run_params.build_models(config)
    rng = jax.random.key(config.train.seed)
    boxed = jax.eval_shape(lambda: run_params.init_params(dit, text_model, config, rng)["dit"])
    # The adapters' start depends only on shapes and the rng: the one the trainer drew.
    initial = nn.meta.unbox(lora.init_adapters(jax.random.fold_in(rng, 2), boxed, config.lora))
    for key, value in traverse_util.flatten_dict(trained["lora"]).items():
        start = traverse_util.flatten_dict(initial)[key]
        assert value.shape == start.shape and not np.array_equal(value, start), key

    # The whole checkpointed state (params, EMA, Adam moments) is adapter-sized.
    state_dir = os.path.join(runs["run"], "checkpoints", "2", "state")
    meta = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    sizes = {jax.tree_util.keystr(p): math.prod(m.shape)
             for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
    adapter_size = sum(v.size for v in jax.tree.leaves(trained))
    assert all("lora" in k or n <= 2 for k, n in sizes.items()), sizes  # + step, rng, counts
    assert sum(sizes.values()) <= 4 * adapter_size + 16
    assert adapter_size < 0.5 * sum(v.size for v in jax.tree.leaves(runs["base_before"]["dit"]))

    # The run's complete weights: the frozen base with the adapters merged, base text.
    weights, _ = init_from.run_weights(runs["run"], "params")
    base = runs["base_before"]
    want = lora.merge_lora(base["dit"], trained["lora"], config.lora)
    jax.tree.map(np.testing.assert_array_equal, weights["dit"], jax.tree.map(np.asarray, want))
    jax.tree.map(np.testing.assert_array_equal, weights["text"], base["text"])
    flat_w, flat_b = (traverse_util.flatten_dict(t, sep="/") for t in (weights["dit"], base["dit"]))
    changed = sorted(k for k in flat_b if not np.array_equal(flat_w[k], flat_b[k]))
    assert changed and all(k.endswith("kernel") and ("attn" in k or "ffn" in k) for k in changed)


def test_sampling_and_export_use_base_plus_adapters(runs):
    weights, _ = init_from.run_weights(runs["run"], "ema")
    gen = Generator.from_workdir(runs["run"])
    jax.tree.map(np.testing.assert_array_equal, gen.dit_params, weights["dit"])
    jax.tree.map(np.testing.assert_array_equal, gen.text_params, weights["text"])

    out = str(runs["root"] / "merged")
    assert cli.main(["export", "--workdir", runs["run"], "--out", out]) == 0
    exported, saved = checkpoint.load_params(out, "ema")
    jax.tree.map(np.testing.assert_array_equal, exported, weights)
    assert not saved["lora"]["enabled"] and saved["train"]["init_from"] == ""
    assert cli.main(["export", "--workdir", runs["run"], "--out", out]) == 1  # no overwrite


def test_lora_resume_refuses_other_adapters(runs):
    config = tiny_config("shapes_lora", runs["latents"], *runs["extra"], "--config.lora.rank=4")
    with pytest.raises(ValueError, match=r"lora\.rank: checkpoint 2 -> now 4"):
        loop.train(config, runs["run"])


def test_the_base_is_pinned_when_the_lora_run_starts(runs):
    """The base run trains on after the LoRA run started: the LoRA run keeps the base step it
    trained against (its saved config names that step folder), and resumes on it. (Last in this
    file: it moves the shared base run on.)"""
    before, saved = init_from.run_weights(runs["run"], "params")
    assert saved["train"]["init_from"] == os.path.join(runs["base"], "checkpoints", "2")
    assert saved["encode"]["vae_workdir"].startswith("/")  # found from any directory
    train_tiny("shapes_dit", runs["base"], runs["latents"], 2,
               f"--config.encode.vae_workdir={runs['root'] / 'vae'}")  # the base: steps 3, 4
    after, _ = init_from.run_weights(runs["run"], "params")
    jax.tree.map(np.testing.assert_array_equal, after, before)
    history = train_tiny("shapes_lora", runs["run"], runs["latents"], 2, *runs["extra"])
    assert [h["step"] for h in history] == [3, 4]
    _, saved = checkpoint.load_params(runs["run"], "params")
    assert saved["train"]["init_from"] == os.path.join(runs["base"], "checkpoints", "2")
    config = tiny_config("shapes_lora", runs["latents"], *runs["extra"],
                         "--config.train.init_from_weights=ema")
    with pytest.raises(ValueError, match=r"train\.init_from_weights: checkpoint 'params' -> now "
                                         r"'ema'"):
        loop.train(config, runs["run"])
