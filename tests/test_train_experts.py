"""Wan2.2 two-expert training (vdit/train/experts.py): each expert trains on its own range of the
shifted flow time, "both" splits a batch's rows between the experts, one-expert runs carry the
other expert bit for bit, resume is exact, LoRA adapts either expert, and sampling the trained run
uses both experts by timestep."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from dit_testing import tiny_model_config
from flax import traverse_util
from train_testing import VIDEOS, tiny_config, train_tiny, write_shards, write_vae_run

from vdit.config import ConfigError, recipe_module
from vdit.convert import export
from vdit.data import pipeline, sources
from vdit.diffusion import flow
from vdit.models import lora
from vdit.pipelines.generate import Generator
from vdit.runs import checkpoint
from vdit.train import experts, init_from, run_params

BOUNDARY = 0.8


def _flow(sampling: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(time_sampling=sampling, logit_mean=0.0, logit_std=1.0,
                                          shift_mode="resolution", shift=2.0, base_tokens=48,
                                          max_shift=3.0))


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_time_sampler_restricted_to_each_experts_range(sampling):
    """Every draw lies in the expert's range of shifted t, with the unrestricted sampler's
    density there (its mean over the range matches draws of the full sampler that land there)."""
    cfg = _flow(sampling)
    seg = jnp.asarray(np.repeat([[1] * 16 + [2] * 80], 4096, axis=0))  # two shifts per row
    rng = jax.random.key(0)
    full = np.asarray(flow.sample_segment_times(rng, seg, 2, cfg))
    for lo, hi in ((BOUNDARY, 1.0), (0.0, BOUNDARY)):
        t = np.asarray(flow.sample_segment_times(jax.random.key(1), seg, 2, cfg, (lo, hi)))
        assert t.shape == (4096, 2) and t.min() >= lo and t.max() < hi
        for k in range(2):  # per segment: each has its own resolution shift
            inside = full[:, k][(full[:, k] >= lo) & (full[:, k] < hi)]
            assert abs(t[:, k].mean() - inside.mean()) < 0.01, (lo, hi, k)
    with pytest.raises(ValueError, match=r"time range \(0.9, 0.5\)"):
        flow.sample_segment_times(rng, seg, 2, cfg, (0.9, 0.5))


def _batch(config, seed: int = 0) -> dict:
    """One packed batch of the tiny test shards (host arrays)."""
    latents = config.data.latents_dir
    source = sources.LatentShardSource(latents)
    it = iter(pipeline.packed_dataset(source, config.data, (1, 2, 2), np.asarray([1], np.int32)))
    return jax.tree.map(jnp.asarray, next(it))


def _tiny_moe(latents: str, *extra: str):
    return tiny_config("shapes_moe", latents, *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny two-expert "both" run (2 steps), then from it a high-noise-only run and a LoRA run
    on the low-noise expert (1 step each); shared latents (with stats) and a zero VAE for
    sampling. (Exact resume is the trainer's, tested on one-DiT runs in tests/test_train.py.)"""
    root = tmp_path_factory.mktemp("experts")
    latents = write_shards(str(root / "latents"), VIDEOS)
    with open(os.path.join(latents, "stats.json"), "w") as f:
        json.dump({"mean": [0.0] * 8, "std": [1.0] * 8}, f)
    vae = str(root / "vae")
    write_vae_run(vae, _tiny_moe(latents))
    extra = (f"--config.encode.vae_workdir={vae}",)
    out = {name: str(root / name) for name in ("full", "high", "lora_low")}
    out |= {"root": root, "latents": latents, "extra": extra}
    out["full_history"] = train_tiny("shapes_moe", out["full"], latents, 2, *extra)
    base = (f"--config.train.init_from={out['full']}", "--config.checkpoint.every=1")
    out["high_history"] = train_tiny("shapes_moe", out["high"], latents, 1, *extra, *base,
                                     "--config.experts.train=high")
    out["lora_history"] = train_tiny("shapes_moe", out["lora_low"], latents, 1, *extra, *base,
                                     "--config.experts.train=low", "--config.lora.enabled=True",
                                     "--config.lora.rank=2")
    return out


def _changed(a, b) -> bool:
    return any(jax.tree.leaves(jax.tree.map(lambda x, y: not np.array_equal(x, y), a, b)))


def test_both_experts_each_learn_from_their_own_rows_and_times(runs):
    """The high-noise expert sees the first half of the rows at t >= boundary, the low-noise
    one the second half below it; each expert's gradient depends on its own rows only."""
    config = _tiny_moe(runs["latents"], *runs["extra"])
    dit, text_model, _ = run_params.build_models(config)
    params, _ = checkpoint.load_params(runs["full"], "params")
    assert set(params) == {"dit", "dit_2"}
    frozen = {"text": init_from.run_weights(runs["full"], "params")[0]["text"]}
    loss_fn = experts.make_loss(dit, text_model, config)
    batch = _batch(config)
    seen = []

    def record(f, args, kwargs, context):
        if context.method_name == "packed":
            jax.debug.callback(lambda *a: seen.append([np.asarray(x) for x in a]), args[2],
                               args[3])
        return f(*args, **kwargs)

    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, frozen, b, jax.random.key(3)),
                                         has_aux=True))
    with nn.intercept_methods(record):
        (loss, aux), grads = grad_fn(params, batch)
    jax.effects_barrier()
    half = config.data.rows_per_batch // 2
    (seg_h, t_h), (seg_l, t_l) = sorted(seen[:2], key=lambda x: -x[1].max())
    assert seg_h.shape[0] == seg_l.shape[0] == half
    present = lambda seg: np.asarray(flow.segment_token_counts(seg, config.data.max_segments)) > 0
    assert np.all(t_h[present(seg_h)] >= 1000 * BOUNDARY)
    assert np.all(t_l[present(seg_l)] < 1000 * BOUNDARY)
    np.testing.assert_array_equal(seg_h, batch["segment_ids"][:half])
    np.testing.assert_allclose(loss, 0.5 * (aux["loss_high"] + aux["loss_low"]), rtol=1e-6)

    # Other tokens in the low expert's rows: the high expert's gradient does not move.
    moved = dict(batch, tokens=batch["tokens"].at[half:].add(1.0))
    _, grads_moved = grad_fn(params, moved)
    jax.tree.map(np.testing.assert_array_equal, grads_moved["dit"], grads["dit"])
    assert _changed(grads_moved["dit_2"], grads["dit_2"])


def test_two_expert_run_logs_and_checkpoints_both(runs):
    assert [h["step"] for h in runs["full_history"]] == [1, 2]
    assert all("loss_high" in h and "loss_low" in h for h in runs["full_history"])
    full, _ = checkpoint.load_params(runs["full"], "params")
    assert set(full) == {"dit", "dit_2"}  # the checkpoint holds both experts
    assert _changed(full["dit"], full["dit_2"])  # two experts, not one saved twice


def test_one_expert_run_carries_the_other_bit_identical(runs):
    trained, _ = checkpoint.load_params(runs["high"], "params")
    assert set(trained) == {"dit"}
    before, _ = init_from.run_weights(runs["full"], "params")
    after, _ = init_from.run_weights(runs["high"], "params")
    assert set(after) == {"dit", "dit_2", "text"}
    jax.tree.map(np.testing.assert_array_equal, after["dit_2"], before["dit_2"])
    assert _changed(after["dit"], before["dit"])


def test_lora_on_the_low_noise_expert_only(runs):
    base, run = runs["full"], runs["lora_low"]
    assert all(np.isfinite(h["loss"]) for h in runs["lora_history"])
    trained, saved = checkpoint.load_params(run, "params")
    assert set(trained) == {"lora_2"}
    before, _ = init_from.run_weights(base, "params")
    after, _ = init_from.run_weights(run, "params")
    jax.tree.map(np.testing.assert_array_equal, after["dit"], before["dit"])
    want = lora.merge_lora(before["dit_2"], trained["lora_2"], ml_collections.ConfigDict(
        saved["lora"]))
    jax.tree.map(np.testing.assert_array_equal, after["dit_2"], jax.tree.map(np.asarray, want))
    flat_a, flat_b = (traverse_util.flatten_dict(t, sep="/") for t in (after["dit_2"],
                                                                       before["dit_2"]))
    assert any(not np.array_equal(flat_a[k], flat_b[k]) for k in flat_b)


def test_sampling_the_trained_run_uses_both_experts(runs):
    """`vdit sample`'s Generator on the run: both trained experts, switched at the boundary; a
    2-step sample (timesteps 1000 and ~667 at flow shift 2) runs each expert once."""
    gen = Generator.from_workdir(runs["full"])
    weights, _ = init_from.run_weights(runs["full"], "ema")
    assert gen.boundary == pytest.approx(1000 * BOUNDARY) and gen.dit_2 is not None
    jax.tree.map(np.testing.assert_array_equal, gen.dit_params, weights["dit"])
    jax.tree.map(np.testing.assert_array_equal, gen.dit_2_params, weights["dit_2"])
    context, mask = gen.encode_text(["a red circle moving left"])
    negative, negative_mask = gen.encode_text([""])
    noise = jax.random.normal(jax.random.key(0), (1, 2, 4, 4, 8))
    run = lambda g: np.asarray(g.text_to_video(context, negative, noise, steps=2, guidance=2.0,
                                               output="latent", context_mask=mask,
                                               negative_mask=negative_mask))
    both = run(gen)
    assert np.all(np.isfinite(both))
    only_high = run(dataclasses.replace(gen, dit_2_params=gen.dit_params))
    only_low = run(dataclasses.replace(gen, dit_params=gen.dit_2_params))
    assert not np.allclose(both, only_high) and not np.allclose(both, only_low)


def test_experts_config_errors_name_the_key(tmp_path):
    config = _tiny_moe(str(tmp_path))
    config.experts.train = "middle"
    with pytest.raises(ConfigError, match=r"'experts.train' = 'middle'"):
        experts.check_config(config)
    config = _tiny_moe(str(tmp_path), "--config.data.rows_per_batch=3")
    with pytest.raises(ConfigError, match=r"'data.rows_per_batch' = 3"):
        experts.check_config(config)
    config = _tiny_moe(str(tmp_path), "--config.experts.boundary_ratio=1.5")
    with pytest.raises(ConfigError, match=r"'experts.boundary_ratio' = 1.5"):
        experts.check_config(config)


def test_a_two_expert_run_refuses_a_one_dit_source(runs):
    """init_from a one-DiT run: the low-noise expert kept its seed init (train both / low) or hit
    a bare KeyError (train high, where it is frozen); now an error names the missing expert."""
    one = str(runs["root"] / "one_dit")
    train_tiny("shapes_dit", one, runs["latents"], 2, *runs["extra"])
    for train in ("both", "high"):
        with pytest.raises(ValueError, match=r"has no \['dit_2'\] \(it holds \['dit', 'text'\]\)"):
            train_tiny("shapes_moe", str(runs["root"] / f"from_one_{train}"), runs["latents"], 1,
                       *runs["extra"], f"--config.train.init_from={one}",
                       f"--config.experts.train={train}")


@pytest.mark.parametrize("trained", ["both", "low"])
def test_adapter_export_keeps_the_low_noise_experts_adapter(tmp_path, trained):
    """`vdit export --adapter` on a two-expert LoRA run writes lora_2 (for dit_2) too, prefixed."""
    from safetensors.numpy import load_file


    factor = lambda v: {"blocks": {"attn1": {"to_q": {"kernel": {
        "a": np.full((2, 24, 4), v, np.float32), "b": np.full((2, 4, 2, 12), v, np.float32)}}}}}
    weights = {"lora_2": factor(2.0)} | ({"lora": factor(1.0)} if trained == "both" else {})
    config = ml_collections.ConfigDict({
        "checkpoint": recipe_module("common").checkpoint(), "model": tiny_model_config(),
        "lora": dict(enabled=True, rank=4, alpha=2.0, targets=["to_q"]),
        "experts": dict(boundary_ratio=0.9, train=trained), "train": dict(init_from="base"),
        "sample": dict(steps=4)})
    checkpoint.write_weights(str(tmp_path / "run"), 0, weights, weights, config)
    written = load_file(export.export_adapter(str(tmp_path / "run"), str(tmp_path / "out")))
    want = {"dit_2/blocks/attn1/to_q/kernel/a", "dit_2/blocks/attn1/to_q/kernel/b"}
    want |= {"blocks/attn1/to_q/kernel/a", "blocks/attn1/to_q/kernel/b"} if trained == "both" \
        else set()
    assert set(written) == want
    np.testing.assert_array_equal(written["dit_2/blocks/attn1/to_q/kernel/a"], 2.0)
    # diffusers' format: one file per expert (transformer_2's for lora_2), scale 2/4 in lora_B
    low = load_file(str(tmp_path / "out" / "pytorch_lora_weights_2.safetensors"))
    assert sorted(low) == [f"transformer.blocks.{i}.attn1.to_q.lora_{x}.weight"
                           for i in (0, 1) for x in "AB"]
    np.testing.assert_array_equal(low["transformer.blocks.1.attn1.to_q.lora_B.weight"], 1.0)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists() == (trained == "both")
    meta = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert meta["adapters"] == {k: lora.ADAPTED[k] for k in weights}
    assert meta["diffusers"] == {k: f for k, f in export.DIFFUSERS_FILES.items() if k in weights}
