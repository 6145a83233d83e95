"""The metrics writer (vdit/train/metrics.py): TensorBoard event files on gs:// (a gcsfs-like file
has a `fileno` that raises and uploads only at close), the events a resumed run replays dropped by
TensorBoard's purge, one metrics.jsonl row per step, and the writer closed when a run fails."""

from __future__ import annotations

import glob
import os
import struct
import time

import numpy as np
import pytest
from remote_fs import install
from tensorboardX.proto.event_pb2 import Event, SessionLog
from train_testing import VIDEOS, train_tiny, write_shards

from vdit.train.metrics import MetricsWriter, read_metrics


def events(folder: str) -> list[Event]:
    """Every event under `folder`, file by file in name (creation time) order, as TensorBoard
    reads them (TFRecord framing: length u64, crc u32, payload, crc u32)."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"),
                                 recursive=True)):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            out.append(Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 16 + length
    return out


def scalars(folder: str) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard shows it: a SessionLog.START at step N discards the
    events read before it with step >= N (tensorboard's event_accumulator, purge_orphaned_data)."""
    seen: list[tuple[int, str, float]] = []
    for event in events(folder):
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            seen = [e for e in seen if e[0] < event.step]
        seen += [(event.step, v.tag, v.simple_value) for v in event.summary.value
                 if not v.HasField("image")]
    out: dict[str, dict[int, float]] = {}
    for step, tag, value in seen:
        assert step not in out.setdefault(tag, {}), f"{tag} shown twice at step {step}"
        out[tag][step] = value
    return out


def test_tensorboard_on_gcs_is_visible_during_training(tmp_path, monkeypatch):
    """tensorboardX fsyncs a file object that has `fileno`: a gcsfs file raised
    UnsupportedOperation at the first flush; and gcsfs uploads only at close."""
    install(monkeypatch, str(tmp_path))
    (tmp_path / "bucket").mkdir()
    writer = MetricsWriter("gs://bucket/run", tensorboard=True)
    writer.write(1, {"loss": 0.5})
    writer.write_videos(1, {"samples/00": np.zeros((2, 8, 8, 3), np.uint8)}, fps=8)  # flushes
    folder = str(tmp_path / "bucket" / "run" / "tensorboard")
    # before close; tensorboardX's writer thread may not have taken the event off its queue at
    # that flush on a loaded machine: the next flush then carries it
    deadline = time.monotonic() + 60
    while not scalars(folder) and time.monotonic() < deadline:
        time.sleep(0.2)
        writer._tb.flush()  # what write_videos does
    assert scalars(folder) == {"loss": {1: 0.5}}
    writer.write(2, {"loss": 0.25})
    writer.close()
    assert scalars(folder) == {"loss": {1: 0.5, 2: 0.25}}
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [1, 2]


@pytest.mark.parametrize("remote", [False, True])
def test_one_row_per_step_and_replayed_steps_purged(tmp_path, monkeypatch, remote):
    """Judge scores written before (or after) the step's loss join its row; a writer resumed at
    step 2 makes TensorBoard show the replayed steps 3, 4 once, with the new values."""
    if remote:
        install(monkeypatch, str(tmp_path))
        (tmp_path / "bucket").mkdir()
    workdir = "gs://bucket/run" if remote else str(tmp_path / "run")
    folder = str(tmp_path / "bucket" / "run" / "tensorboard") if remote else workdir + "/tensorboard"
    writer = MetricsWriter(workdir, tensorboard=True)
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"judge/all": 0.5})  # periodic samples at step 2, before its loss is fetched
    writer.write(2, {"loss": 2.0})
    writer.write(3, {"loss": 3.0})
    writer.write(3, {"eval/psnr": 30.0})
    writer.write(4, {"loss": 4.0})
    writer.close()
    rows = read_metrics(workdir)
    assert [(r["step"], r.get("loss"), r.get("judge/all"), r.get("eval/psnr")) for r in rows] == [
        (1, 1.0, None, None), (2, 2.0, 0.5, None), (3, 3.0, None, 30.0), (4, 4.0, None, None)]

    time.sleep(1.1)  # event files are named by the second they start in: a new one, read after
    writer = MetricsWriter(workdir, tensorboard=True, start_step=2)  # resumed from step 2
    writer.write(3, {"loss": 30.0})
    writer.write(4, {"loss": 40.0})
    writer.close()
    assert scalars(folder)["loss"] == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}
    assert scalars(folder)["judge/all"] == {2: 0.5}


def test_writer_closed_when_the_run_fails(tmp_path):
    """A run stopped by an error (here periodic samples failing at step 2) still flushes its
    events: tensorboardX queues them until close (or 120 s)."""
    workdir = str(tmp_path / "run")
    latents = write_shards(str(tmp_path / "latents"), VIDEOS)

    class Failing:
        def maybe_write(self, step, ema, frozen, writer):
            if step == 2:
                raise RuntimeError("sampler broke")

    with pytest.raises(RuntimeError, match="sampler broke"):
        train_tiny("shapes_dit", workdir, latents, 3, "--config.train.tensorboard=True",
                   "--config.train.i2v_rate=0.0", samples_fn=lambda *a: Failing())
    assert set(scalars(os.path.join(workdir, "tensorboard"))["loss"]) == {1, 2}
