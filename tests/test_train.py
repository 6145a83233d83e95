"""The DiT trainer on tiny latent shards: it learns, resumes exactly, skips non-finite steps,
refuses a model-shape change on resume."""

import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from vdit.config import load_config
from vdit.data import sources
from vdit.models.tokenizers import ByteTokenizer
from vdit.train import loop, step_loop
from vdit.train.metrics import read_metrics

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_dit.py")
TINY = ["--config.model.num_layers=1", "--config.model.num_attention_heads=2",
        "--config.model.attention_head_dim=8", "--config.model.ffn_dim=32",
        "--config.model.text_dim=16", "--config.model.freq_dim=16",
        "--config.text.d_model=16", "--config.text.d_kv=8", "--config.text.d_ff=32",
        "--config.text.num_layers=1", "--config.text.num_heads=2", "--config.text.max_length=32",
        "--config.data.tokens_per_row=48", "--config.data.text_per_row=96",
        "--config.data.rows_per_batch=8", "--config.data.max_segments=4",
        "--config.data.prefetch=0", "--config.train.progress=False",
        "--config.train.tensorboard=False", "--config.train.log_every=1",
        "--config.optim.warmup_steps=0", "--config.checkpoint.every=2",
        "--config.checkpoint.async_save=False", "--config.train.steps=12",
        "--config.optim.lr=3e-3", "--config.train.i2v_rate=0.0",
        "--config.text.kind=byte"]  # the test shards hold byte token ids
SHAPES = [(1, 4, 4), (2, 4, 8), (3, 4, 4), (2, 8, 4)]


def _write_shards(folder, nan: bool = False):
    tok = ByteTokenizer(32)
    rng = np.random.default_rng(0)
    examples = []
    for i in range(16):
        t, h, w = SHAPES[i % len(SHAPES)]
        latents = rng.normal(size=(t, h, w, 8)).astype(np.float32) + (i % 3)
        if nan:
            latents[:] = np.nan
        caption = ["a red circle moving left", "a blue square", "green triangle up"][i % 3]
        ids, mask = tok([caption])
        examples.append({"latents": latents, "text": ids[0][: int(mask[0].sum())],
                         "caption": caption})
    sources.write_shard(os.path.join(folder, "latents-00000-of-00001.array_record"), examples)


def _config(workdir, *extra):
    return load_config(CONFIG, TINY + [f"--config.data.latents_dir={workdir}/latents", *extra])


@pytest.fixture()
def workdir(tmp_path):
    _write_shards(str(tmp_path / "latents"))
    return str(tmp_path)


def test_trains_and_loss_falls(workdir):
    """...and writes the profiler window's trace and the persistent compilation cache."""
    cache, session_cache = os.path.join(workdir, "jax-cache"), jax.config.jax_compilation_cache_dir
    try:
        history = loop.train(_config(workdir, "--config.train.profile_steps=2",
                                     "--config.train.profile_skip=3",
                                     f"--config.train.compilation_cache_dir={cache}"), workdir)
    finally:  # later tests in this process share the session's cache again
        compilation_cache.set_cache_dir(session_cache)
        compilation_cache.reset_cache()
    losses = [h["loss"] for h in history]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4])
    rows = read_metrics(workdir)
    assert rows[-1]["step"] == 12 and "tokens_per_s" in rows[-1] and rows[-1]["data/skipped"] == 0
    assert all(r["data_time"] >= 0 and r["step_time"] > 0 for r in rows)
    traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    assert os.listdir(cache)  # the compiled step was written to the configured cache


def test_host_fetches_each_step_after_dispatching_the_next(monkeypatch):
    """The loop never waits on the step it just dispatched: step s's outputs are fetched after
    step s+1 is queued, except where it must wait (a checkpoint step, the last step)."""
    events = []

    class State:
        ema = None

    def compiled(state, frozen, batch):
        events.append(f"run{batch}")
        return state, {"loss": np.float32(1.0), "grad_norm": np.float32(1.0),
                       "tokens": np.int32(8), "bad_streak": np.int32(0),
                       "bad_total": np.int32(0), "step": batch}

    def device_get(out):
        events.append(f"get{out['step']}")
        return out

    monkeypatch.setattr(step_loop.jax, "device_get", device_get)
    monkeypatch.setattr(step_loop.pipeline, "to_global", lambda batch, mesh: batch)
    monkeypatch.setattr(step_loop, "check_saves", lambda *a, **k: None)
    monkeypatch.setattr(step_loop.checkpoint, "save", lambda m, s, *a: events.append(f"save{s}"))

    class Writer:
        def write(self, step, metrics):
            pass

    config = _config("unused", "--config.checkpoint.every=4", "--config.train.steps=6")
    source = type("Source", (), {"skipped": 0})()
    loop_ = step_loop.StepLoop(compiled, 1.0, None, None, Writer(), config, "unused", None)
    history = loop_.run(State(), {}, iter(range(1, 7)), source, 0, 6)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert events == ["run1", "run2", "get1", "run3", "get2", "run4", "get3", "get4", "save4",
                      "run5", "run6", "get5", "get6", "save6"]


def test_resume_is_exact(workdir, tmp_path):
    other = str(tmp_path / "b")
    _write_shards(os.path.join(other, "latents"))
    full = loop.train(_config(workdir), workdir, stop_after=7)
    first = loop.train(_config(other), other, stop_after=4)
    resharded = str(tmp_path / "c")  # the same checkpoint, resumed on another mesh
    shutil.copytree(other, resharded)
    second = loop.train(_config(other), other, stop_after=3)
    assert [h["step"] for h in first + second] == list(range(1, 8))
    np.testing.assert_allclose([h["loss"] for h in first + second],
                               [h["loss"] for h in full], rtol=1e-6, atol=1e-7)
    mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]
    third = loop.train(_config(resharded, *mesh), resharded, stop_after=3)
    assert [h["step"] for h in third] == [5, 6, 7]
    np.testing.assert_allclose([h["loss"] for h in third], [h["loss"] for h in full[4:]],
                               rtol=1e-5)


def test_resume_refuses_model_change(workdir):
    loop.train(_config(workdir), workdir, stop_after=2)
    with pytest.raises(ValueError, match=r"model\.ffn_dim.*32.*64"):
        loop.train(_config(workdir, "--config.model.ffn_dim=64"), workdir)
    # The same checkpoint as two hosts would have left it: one iterator position per process.
    data = os.path.join(workdir, "checkpoints", "2", "data")
    loop.check_process_count(workdir, 2, 1)  # the host count it was written with: resumes
    saved = os.path.join(data, "process_0-of-1.json")
    for i in range(2):
        shutil.copy(saved, os.path.join(data, f"process_{i}-of-2.json"))
    os.remove(saved)
    with pytest.raises(ValueError, match=r"cannot resume .* on 1 process.*of 2 process\(es\), "
                                         r"each over its own slice.*Resume on 2 hosts"):
        loop.train(_config(workdir), workdir)


def test_resume_allows_compute_settings():
    """remat, dtypes and the attention backend change no tensor: a resume may change them."""
    saved = {"model": {"ffn_dim": 32, "remat": "full", "matmul_dtype": "bfloat16"},
             "text": {"d_model": 8, "dtype": "float32"}}
    config = ml_collections.ConfigDict({"model": {"ffn_dim": 32, "remat": "none",
                                                  "matmul_dtype": ""},
                                        "text": {"d_model": 8, "dtype": "bfloat16"}})
    loop.check_resume_compatible(saved, config)
    config.text.d_model = 16
    with pytest.raises(ValueError, match=r"text\.d_model: checkpoint 8 -> now 16"):
        loop.check_resume_compatible(saved, config)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    workdir = str(tmp_path)
    _write_shards(os.path.join(workdir, "latents"), nan=True)
    with pytest.raises(step_loop.NonFiniteError, match=r"step 3: 3 consecutive"):
        loop.train(_config(workdir, "--config.train.max_bad_steps=3"), workdir)
    rows = read_metrics(workdir)
    assert [r["nonfinite_total"] for r in rows] == [1, 2, 3]


def test_refuses_shards_of_another_tokenizer(workdir):
    """Shards record their tokenizer (stats.json); ids of another vocabulary are an error that
    names both, not a run of garbage (or non-finite) losses. Only the max length may differ."""
    import json

    from vdit.data import encode

    stats = {"mean": [0.0] * 8, "std": [1.0] * 8, encode.TOKENIZER_KEY: ByteTokenizer(32).fingerprint()}
    with open(os.path.join(workdir, "latents", encode.STATS_FILE), "w") as f:
        json.dump(stats, f)
    with pytest.raises(ValueError, match=r"cannot train on .*byte:v258.*config\.text gives .*word:"):
        loop.train(_config(workdir, "--config.text.kind=word"), workdir)
    encode.check_tokenizer(stats, ByteTokenizer(64), workdir, "train on")  # length only: fine


def test_refuses_shards_encoded_for_another_model(workdir):
    """Latents of other channels are a start-up error naming the shard, not a pipeline that skips
    every record (the records are bad for this model, not corrupt)."""
    with pytest.raises(ValueError, match=r"latent shard .* does not fit the model: its first "
                                         r"record has latents of shape \(1, 4, 4, 8\): the model "
                                         r"takes 4 channels"):
        loop.train(_config(workdir, "--config.model.out_channels=4",
                           "--config.model.in_channels=12"), workdir)
