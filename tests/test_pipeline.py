"""Grain pipeline: packing layout, skipped records, per-host sharding, exact resume."""

import multiprocessing
import os
import signal
import time

import grain
import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from vdit.data import pipeline, sources
from vdit.models import patches

PATCH = (1, 2, 2)
SHAPES = [(1, 4, 6), (3, 8, 4), (2, 6, 6), (3, 4, 4)]  # latent (T', H', W'); C = 4


def _example(i):
    rng = np.random.default_rng(i)
    t, h, w = SHAPES[i % len(SHAPES)]
    latents = rng.normal(size=(t, h, w, 4)).astype(np.float32)
    latents[..., 0] = i  # lets a test find which clip a token came from
    return {"latents": latents, "text": np.arange(1, 3 + i % 4, dtype=np.int32) + i,
            "caption": f"clip {i}", "meta": {"index": i}}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    sources.write_shard(str(folder / "latents-00000-of-00002.array_record"),
                        [_example(i) for i in range(12)])
    sources.write_shard(str(folder / "latents-00001-of-00002.array_record"),
                        [_example(i) for i in range(12, 24)])
    return str(folder)


def _cfg(**kw):
    base = dict(tokens_per_row=64, text_per_row=24, rows_per_batch=4, max_segments=6, pack_bins=4,
                shuffle_seed=3, caption_dropout=0.0, num_workers=0, prefetch=0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _dataset(shard_dir, cfg, index=0, count=1):
    src = sources.SkippingSource(sources.LatentShardSource(shard_dir))
    return pipeline.packed_dataset(src, cfg, PATCH, np.array([1], np.int32), index, count)


def test_record_round_trip():
    ex = _example(5)
    back = sources.decode_record(sources.encode_record(ex))
    np.testing.assert_array_equal(back["latents"], ex["latents"])
    np.testing.assert_array_equal(back["text"], ex["text"])
    assert back["caption"] == "clip 5" and back["meta"] == {"index": 5}
    with pytest.raises(ValueError, match="missing keys.*caption"):
        sources.encode_record({"latents": ex["latents"], "text": ex["text"]})


def test_packing_layout(shard_dir):
    batch = next(iter(_dataset(shard_dir, _cfg())))
    assert batch["tokens"].shape == (4, 64, 16) and batch["positions"].shape == (4, 64, 3)
    assert batch["text"].shape == (4, 24) and batch["text_segment_ids"].shape == (4, 24)
    for row in range(4):
        seg, tok, pos = batch["segment_ids"][row], batch["tokens"][row], batch["positions"][row]
        assert np.all(np.diff(seg[seg > 0]) >= 0), "segments are contiguous and ordered"
        assert np.all(tok[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
        for k in np.unique(seg[seg > 0]):
            clip = int(tok[seg == k][0, 0])  # channel 0 of every patch holds the clip index
            want_tokens, want_pos = patches.patchify(_example(clip)["latents"], PATCH)
            np.testing.assert_array_equal(tok[seg == k], want_tokens)
            np.testing.assert_array_equal(pos[seg == k], want_pos)
            text = batch["text"][row][batch["text_segment_ids"][row] == k]
            np.testing.assert_array_equal(text, _example(clip)["text"])


def test_corrupt_record_is_skipped_and_counted(tmp_path):
    path = str(tmp_path / "latents-00000-of-00001.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i in range(6):
        data = sources.encode_record(_example(i)) if i != 2 else b"\x00not msgpack\xff" * 3
        writer.write(data)
    writer.close()
    src = sources.SkippingSource(sources.LatentShardSource(str(tmp_path)))
    ds = pipeline.packed_dataset(src, _cfg(rows_per_batch=1, pack_bins=1), PATCH,
                                 np.array([1], np.int32), 0, 1)
    it = iter(ds)
    seen = set()
    for _ in range(6):
        row = next(it)
        seg = row["segment_ids"][0]
        seen |= {int(row["tokens"][0][seg == k][0, 0]) for k in np.unique(seg[seg > 0])}
    assert src.skipped == 1 and 2 not in seen and seen == {0, 1, 3, 4, 5}  # read again, once


def test_records_the_model_cannot_take_are_skipped_and_counted(tmp_path):
    """Wrong channels, a grid the patch does not divide, no frames, no text, or text of the wrong
    rank: each record is skipped and counted by its source, the rest pack as usual."""
    bad = {
        1: lambda ex: dict(ex, latents=np.zeros((1, 4, 4, 6), np.float32)),
        2: lambda ex: dict(ex, latents=np.zeros((1, 5, 4, 4), np.float32)),
        3: lambda ex: dict(ex, latents=np.zeros((0, 4, 4, 4), np.float32)),
        4: lambda ex: dict(ex, text=np.zeros((0,), np.int32)),
        5: lambda ex: dict(ex, text=np.ones((3, 5), np.int32)),
    }
    records = [bad.get(i, lambda ex: ex)(_example(i)) for i in range(8)]
    sources.write_shard(str(tmp_path / "latents-00000-of-00001.array_record"), records)
    check = pipeline.record_check(PATCH, 4, None)
    src = sources.SkippingSource(sources.LatentShardSource(str(tmp_path)), check)
    assert [src[i] is None for i in range(8)] == [i in bad for i in range(8)]
    assert src.skipped == len(bad)
    it = iter(pipeline.packed_dataset(src, _cfg(rows_per_batch=1, pack_bins=1), PATCH,
                                      np.array([1], np.int32), 0, 1))
    seen = set()
    for _ in range(6):
        row = next(it)
        seg = row["segment_ids"][0]
        seen |= {int(row["tokens"][0][seg == k][0, 0]) for k in np.unique(seg[seg > 0])}
    assert seen == {0, 6, 7}
    embeddings = pipeline.record_check(PATCH, 4, 8)
    embeddings(dict(_example(0), text=np.ones((3, 8), np.float32)))
    with pytest.raises(ValueError, match=r"text of shape \(3, 5\) .*embeddings \[L, 8\]"):
        embeddings(dict(_example(0), text=np.ones((3, 5), np.float32)))


def test_oversized_example_is_a_config_error(shard_dir):
    """A clip longer than a row (latents (3, 8, 4): 24 tokens) stops the pipeline with its shape
    and the key to raise, instead of the packer dropping it."""
    with pytest.raises(ValueError, match=r"latent shape \(3, 8, 4, 4\) has 24 tokens but config "
                                         r"key 'data.tokens_per_row' is 20"):
        it = iter(_dataset(shard_dir, _cfg(tokens_per_row=20)))
        for _ in range(4):
            next(it)


def test_each_process_reads_its_own_slice(shard_dir):
    cfg = _cfg(rows_per_batch=2, pack_bins=1, max_segments=1)

    def clips(index):
        it = iter(_dataset(shard_dir, cfg, index, 2))
        out = []
        for _ in range(12):  # one clip per row, one row per process batch: 12 = one epoch each
            row = next(it)
            out.append(int(row["tokens"][0, 0, 0]))
        return out

    a, b = clips(0), clips(1)
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(24))


def test_resume_gives_the_same_batches(shard_dir):
    cfg = _cfg(caption_dropout=0.5)
    full = [b for _, b in zip(range(7), iter(_dataset(shard_dir, cfg)), strict=False)]
    it = iter(_dataset(shard_dir, cfg))
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = iter(_dataset(shard_dir, cfg))
    resumed.set_state(state)
    for want in full[3:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_reader_threads_change_no_batch(shard_dir):
    """data.read_threads / read_buffer only move where records are read: in-thread reads give
    the batches Grain's default readers give, and a position saved under one resumes under the
    other."""
    cfg = _cfg(caption_dropout=0.5)
    threaded = [b for _, b in zip(range(6), iter(_dataset(shard_dir, cfg)), strict=False)]
    inline_cfg = _cfg(caption_dropout=0.5, read_threads=0, read_buffer=0)
    assert pipeline.read_options(inline_cfg).num_threads == 0
    assert pipeline.read_options(cfg) == grain.ReadOptions()
    it = iter(_dataset(shard_dir, inline_cfg))
    inline = [next(it) for _ in range(3)]
    resumed = iter(_dataset(shard_dir, cfg))
    resumed.set_state(it.get_state())
    for want, got in zip(threaded, inline + [next(resumed) for _ in range(3)], strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_workers_leave_sigterm_to_the_trainer(shard_dir):
    """A preemption's SIGTERM reaches every process of the job: Grain's workers keep serving (the
    trainer saves at its step boundary, which needs more batches) and stop when the iterator
    closes."""
    want = list(zip(range(4), iter(_dataset(shard_dir, _cfg()))))
    it = iter(_dataset(shard_dir, _cfg(num_workers=1)))
    got = [next(it)]
    workers = [p for p in multiprocessing.active_children() if p.name.startswith("grain")]
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGTERM)
    time.sleep(1.0)
    assert workers[0].is_alive()
    got += [next(it) for _ in range(3)]  # more than the worker's buffer holds
    for (_, a), b in zip(want, got):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    it.close()
    assert not workers[0].is_alive()


def test_packing_beats_padding(shard_dir):
    batch = next(iter(_dataset(shard_dir, _cfg(tokens_per_row=96, pack_bins=8))))
    assert (batch["segment_ids"] > 0).mean() > 0.8


def test_global_array_on_mesh():
    import jax

    from vdit.parallel.mesh import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 4})
    local = {"segment_ids": np.arange(8 * 5).reshape(8, 5).astype(np.int32)}
    out = pipeline.to_global(local, mesh)["segment_ids"]
    assert out.shape == (8, 5) and len(out.sharding.device_set) == 8
    np.testing.assert_array_equal(jax.device_get(out), local["segment_ids"])


def test_grain_checkpoint_handler_roundtrip(shard_dir, tmp_path):
    import orbax.checkpoint as ocp

    cfg = _cfg()
    it = iter(_dataset(shard_dir, cfg))
    next(it)
    path = os.path.join(str(tmp_path), "it")
    ckptr = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    ckptr.save(path, args=grain.checkpoint.CheckpointSave(it))
    want = next(it)
    it2 = iter(_dataset(shard_dir, cfg))
    ckptr.restore(path, args=grain.checkpoint.CheckpointRestore(it2))
    np.testing.assert_array_equal(next(it2)["tokens"], want["tokens"])
