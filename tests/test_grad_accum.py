"""Gradient accumulation (optim.grad_accum = k): k micro-batches update the weights and the EMA
exactly as one batch of all their rows, whatever segments each holds; k = 1 computes what it did
before accumulation weighed micro-batches; a run resumes in the middle of an accumulation; a step
count that is not whole updates is a config error."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import test_train

from vdit.config import ConfigError, load_config, recipe_module
from vdit.diffusion import flow
from vdit.models.tokenizers import ByteTokenizer
from vdit.runs import checkpoint
from vdit.train import config_checks, optim, run_params, vae_loop
from vdit.train.objective import make_loss_terms
from vdit.train.state import TrainState
from vdit.train.step import make_train_step

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_dit.py")
workdir = test_train.workdir  # the fixture: tiny latent shards in tmp_path


def _optim(k: int, **overrides) -> ml_collections.ConfigDict:
    cfg = recipe_module("common").optim()
    cfg.update(dict(lr=0.1, warmup_steps=0, schedule="constant", grad_accum=k) | overrides)
    return cfg


def _state(params, tx) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, ema=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(0)), bad_streak=zero, bad_total=zero)


def _run(loss_fn, params, batch_parts, k: int, updates: int, ema_decay: float, frozen=None,
         **optim_cfg):
    """`updates` optimizer updates of k micro-batches each (cycling through `batch_parts`)."""
    tx = optim.make_optimizer(_optim(k, **optim_cfg), updates * k)
    step = jax.jit(make_train_step(loss_fn, tx, ema_decay))
    state = _state(params, tx)
    for i in range(updates * k):
        state, _ = step(state, frozen or {}, batch_parts[i % len(batch_parts)])
    return state


def test_ema_moves_once_per_update():
    """Between updates the weights stand still; an EMA step there decayed it k times per update
    (after 5 updates: 0.8686 for k = 1, 0.8086 for k = 2, 0.7300 for k = 4)."""
    rs = np.random.default_rng(0)
    x, y = rs.normal(size=(8, 4)).astype(np.float32), rs.normal(size=(8,)).astype(np.float32)

    def loss_fn(params, frozen, batch, rng):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}

    runs = {}
    for k in (1, 2, 4):
        n = 8 // k
        parts = [{"x": x[j * n:(j + 1) * n], "y": y[j * n:(j + 1) * n]} for j in range(k)]
        runs[k] = _run(loss_fn, {"w": jnp.ones(4)}, parts, k, 5, 0.9, clip_norm=1.0,
                       weight_decay=0.0)
    for k in (2, 4):
        np.testing.assert_allclose(runs[k].params["w"], runs[1].params["w"], rtol=1e-5)
        np.testing.assert_allclose(runs[k].ema["w"], runs[1].ema["w"], rtol=1e-5)
    assert not np.allclose(runs[1].ema["w"], runs[1].params["w"])  # the EMA lags: it is tested


# Two micro-batches of two rows: one clip per row (2 segments), then 4 and 3 clips (7 segments).
ROW_CLIPS = [[12], [10], [3, 3, 3, 3], [4, 4, 4]]
ROWS, TOKENS, TEXT = 4, 16, 48


@pytest.fixture(scope="module")
def dit_setup():
    """(trainable params, frozen params, loss_fn, a 4-row batch) of the tiny DiT, built once."""
    config = load_config(CONFIG, test_train.TINY + ["--config.data.tokens_per_row=16",
                                                    "--config.data.text_per_row=48",
                                                    "--config.model.remat=none"])
    # float32 matmuls: bfloat16 operands round differently in a 2-row and a 4-row batch
    config.model.matmul_dtype = ""
    dit, text_model, _ = run_params.build_models(config)
    boxed = run_params.init_params(dit, text_model, config, jax.random.key(0))
    params, frozen = run_params.split_trainable(config, nn.meta.unbox(boxed))
    terms = make_loss_terms(dit, text_model, config)

    def loss_fn(params, frozen, batch, rng):  # times and noise fixed by the batch: no draw
        return terms(params, frozen, batch, batch["t"], batch["noise"], rng)

    rs = np.random.default_rng(1)
    tok = ByteTokenizer(32)
    seg = np.zeros((ROWS, TOKENS), np.int32)
    text = np.zeros((ROWS, TEXT), np.int32)
    text_seg = np.zeros((ROWS, TEXT), np.int32)
    for r, clips in enumerate(ROW_CLIPS):
        at = text_at = 0
        for i, n in enumerate(clips, start=1):
            seg[r, at:at + n], at = i, at + n
            ids, mask = tok(["a red circle"[: 4 + 2 * i]])
            ids = ids[0][: int(mask[0].sum())]
            text[r, text_at:text_at + len(ids)] = ids
            text_seg[r, text_at:text_at + len(ids)], text_at = i, text_at + len(ids)
    batch = {"tokens": rs.normal(size=(ROWS, TOKENS, dit.token_out_dim)).astype(np.float32),
             "positions": rs.integers(0, 4, size=(ROWS, TOKENS, 3)).astype(np.int32),
             "segment_ids": seg, "text": text, "text_segment_ids": text_seg,
             "text_positions": np.tile(np.arange(TEXT, dtype=np.int32), (ROWS, 1)),
             "t": rs.uniform(0.05, 0.95, size=(ROWS, 4)).astype(np.float32),
             "noise": rs.normal(size=(ROWS, TOKENS, dit.token_out_dim)).astype(np.float32)}
    return params, frozen, loss_fn, batch


def test_accumulation_equals_the_concatenated_batch(dit_setup):
    """Micro-batches of 2 and 7 segments: each micro-batch's loss is a mean over its own
    segments, and averaging those means gave a 2-segment micro-batch's clips 7/2 times the weight
    of the other's (gradients 35% apart on the probe's batch)."""
    params, frozen, loss_fn, batch = dit_setup
    halves = [jax.tree.map(lambda x: x[:2], batch), jax.tree.map(lambda x: x[2:], batch)]
    assert [float(flow.loss_segments(h["segment_ids"], 4)) for h in halves] == [2.0, 7.0]
    once = _run(loss_fn, params, [batch], 1, 2, 0.9, frozen, lr=3e-3)
    accumulated = _run(loss_fn, params, halves, 2, 2, 0.9, frozen, lr=3e-3)
    for which in ("params", "ema"):
        a, b = getattr(once, which), getattr(accumulated, which)
        moved = max(float(jnp.max(jnp.abs(x - p))) for x, p in
                    zip(jax.tree.leaves(a), jax.tree.leaves(params)))
        assert moved > 5e-4  # 50x the tolerance below: the comparison is not vacuous
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-5)


def test_k1_step_is_the_plain_step(dit_setup):
    """Without accumulation the loss, the update and the EMA are bitwise what they were: the
    plain AdamW step written out, and packed_loss's mean over the segments present."""
    params, frozen, loss_fn, batch = dit_setup
    tx = optim.make_optimizer(_optim(1, lr=3e-3), 10)
    state = _state(params, tx)

    def reference(state, frozen, batch):  # the step before accumulation weighed micro-batches
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen,
                                                                      batch, step_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema, params)
        return loss, params, ema, opt_state

    loss, params_ref, ema_ref, opt_ref = jax.jit(reference)(state, frozen, batch)
    new, metrics = jax.jit(make_train_step(loss_fn, tx, 0.9))(state, frozen, batch)
    assert "loss_weight" not in metrics
    np.testing.assert_array_equal(metrics["loss"], loss)
    for a, b in zip(jax.tree.leaves((params_ref, ema_ref, opt_ref)),
                    jax.tree.leaves((new.params, new.ema, new.opt_state))):
        np.testing.assert_array_equal(b, a)

    def old_packed_loss(pred, target, segment_ids, num_segments):
        per_tok = jnp.mean(jnp.square(pred - target), -1)
        onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
        onehot = onehot * (segment_ids > 0).astype(jnp.float32)[..., None]
        seg_sum = jnp.einsum("bs,bsk->bk", per_tok, onehot)
        seg_count = jnp.sum(onehot, axis=1)
        present = seg_count > 0
        seg_loss = jnp.where(present, seg_sum / jnp.maximum(seg_count, 1.0), 0.0)
        return jnp.sum(seg_loss) / jnp.maximum(jnp.sum(present), 1)

    pred = batch["noise"][::-1] * 0.5
    new_loss = jax.jit(lambda *a: flow.packed_loss(*a, 4)[0])(pred, batch["tokens"],
                                                              batch["segment_ids"])
    old_loss = jax.jit(lambda *a: old_packed_loss(*a, 4))(pred, batch["tokens"],
                                                          batch["segment_ids"])
    np.testing.assert_array_equal(new_loss, old_loss)


def test_resume_in_the_middle_of_an_accumulation(workdir, tmp_path):
    """A checkpoint at step 3 of k = 2 holds half an accumulation (its gradients and weight):
    3 + 3 steps end where 6 in one go do."""
    extra = ("--config.optim.grad_accum=2", "--config.checkpoint.every=3")
    other = str(tmp_path / "b")
    test_train._write_shards(os.path.join(other, "latents"))
    full = test_train.loop.train(test_train._config(workdir, *extra), workdir, stop_after=6)
    first = test_train.loop.train(test_train._config(other, *extra), other, stop_after=3)
    second = test_train.loop.train(test_train._config(other, *extra), other, stop_after=3)
    assert [h["step"] for h in first + second] == list(range(1, 7))
    np.testing.assert_allclose([h["loss"] for h in first + second], [h["loss"] for h in full],
                               rtol=1e-6, atol=1e-7)
    for which in ("params", "ema"):
        a, _ = checkpoint.load_params(workdir, which, 6)
        b, _ = checkpoint.load_params(other, which, 6)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("steps, k, ok", [(12, 2, True), (12, 1, True), (13, 1, True),
                                          (13, 2, False), (3, 4, False)])
def test_steps_are_whole_updates(steps, k, ok):
    config = ml_collections.ConfigDict({"train": {"steps": steps}, "optim": {"grad_accum": k}})
    if ok:
        config_checks.check_accumulation(config)
        return
    with pytest.raises(ConfigError, match=rf"'train.steps' = {steps} is not a multiple of "
                                          rf"'optim.grad_accum' = {k}.*set train.steps to"):
        config_checks.check_accumulation(config)


def test_vae_training_checks_its_own_step_count(tmp_path):
    """`vdit train-vae` counts vae_train.steps: a remainder there is refused at start-up too."""
    config = ml_collections.ConfigDict({"vae_train": {"steps": 7}, "optim": {"grad_accum": 2}})
    with pytest.raises(ConfigError, match=r"'vae_train.steps' = 7 is not a multiple"):
        vae_loop._train_vae(config, str(tmp_path))


def _linear_loss(params, frozen, batch, rng):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}


def test_a_non_finite_micro_batch_counts_toward_its_update():
    """k = 2, micro-batch 2 of 4 non-finite: updates still land on steps 2 and 4 (the run ends
    on a whole update), the first from micro-batch 1 alone, the second from 3 and 4: as k = 1 on
    [1, 3 + 4]."""
    rs = np.random.default_rng(2)
    parts = [{"x": rs.normal(size=(4, 3)).astype(np.float32),
              "y": rs.normal(size=(4,)).astype(np.float32)} for _ in range(4)]
    bad = {"x": parts[1]["x"] * np.nan, "y": parts[1]["y"]}
    cfg = dict(clip_norm=0.0, weight_decay=0.0)
    tx = optim.make_optimizer(_optim(2, **cfg), 4)
    step = jax.jit(make_train_step(_linear_loss, tx, 0.9))
    state = _state({"w": jnp.ones(3)}, tx)
    for batch in (parts[0], bad, parts[2], parts[3]):
        state, metrics = step(state, {}, batch)
    assert int(state.opt_state.mini_step) == 0 and int(state.opt_state.gradient_step) == 2
    joined = {k: np.concatenate([parts[2][k], parts[3][k]]) for k in parts[0]}
    once = _run(_linear_loss, {"w": jnp.ones(3)}, [parts[0], joined], 1, 2, 0.9, **cfg)
    np.testing.assert_allclose(state.params["w"], once.params["w"], rtol=1e-5)
    np.testing.assert_allclose(state.ema["w"], once.ema["w"], rtol=1e-5)
    # every micro-batch of an update non-finite: no update at all (AdamW would still move them)
    state = _state({"w": jnp.ones(3)}, tx)
    for _ in range(2):
        state, _ = step(state, {}, bad)
    np.testing.assert_array_equal(state.params["w"], np.ones(3))


def test_a_smaller_grad_accum_on_resume_still_updates():
    """A checkpoint 3 micro-batches into k = 4, resumed with k = 2: the next step updates."""
    params = {"w": jnp.ones(2)}
    grads = {"w": jnp.ones(2)}
    four, two = optim.accumulate(optax.sgd(0.1), 4), optim.accumulate(optax.sgd(0.1), 2)
    state = four.init(params)
    for _ in range(3):
        _, state = four.update(grads, state, params)
    updates, state = two.update(grads, state, params)
    assert int(state.mini_step) == 0 and float(updates["w"][0]) == pytest.approx(-0.1)
