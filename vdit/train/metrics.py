"""Run metrics: JSON lines (`metrics.jsonl`) and TensorBoard event files in the workdir.

Only process 0 writes; other processes get a writer that drops everything, so callers never branch.
`metrics.jsonl` keeps one row per step: values written for the step of the last row (periodic
samples' judge scores, the VAE's eval PSNR) are merged into that row. A writer opened at a
resume step (`start_step`) makes TensorBoard drop the events of later steps from earlier runs,
which the resumed run replays (as `drop_rows_after` does for metrics.jsonl).
On an object store (gs://) each event file is kept in memory and rewritten whole at each flush,
so TensorBoard sees it during training.
`write_videos` puts videos in TensorBoard as animated GIF images (one tag per video, shown in the
Images dashboard) without moviepy: the GIF is encoded here with Pillow.
"""

from __future__ import annotations

import io
import json
import time

import jax
import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter, record_writer
from tensorboardX.proto.summary_pb2 import Summary

from vdit import runs


class MetricsWriter:
    def __init__(self, workdir: str, tensorboard: bool = True, start_step: int = 0):
        self._enabled = jax.process_index() == 0
        self._tb = None
        if not self._enabled:
            return
        runs.user_path(workdir).mkdir(parents=True, exist_ok=True)
        self._jsonl = _Appender(runs.metrics_path(workdir))
        if tensorboard:
            folder = str(runs.tensorboard_dir(workdir))
            if runs.is_remote(folder):
                # tensorboardX's own gs/s3 writers need google-cloud-storage / boto; route remote
                # event files through the path layer instead (its registry is keyed by scheme).
                record_writer.register_writer_factory(folder.split(":")[0], _EpathEvents())
            # A SessionLog.START at purge_step: TensorBoard discards the earlier events of steps
            # >= purge_step, i.e. those of a previous run after the checkpoint resumed from.
            self._tb = SummaryWriter(folder, purge_step=int(start_step) + 1)
        self._row: dict | None = None  # the last row written (merged into for the same step)

    def write(self, step: int, metrics: dict) -> None:
        if not self._enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        if self._row is not None and self._row["step"] == int(step):
            self._row = {**self._row, "time": time.time(), **values}
            self._jsonl.replace_last(json.dumps(self._row) + "\n")
        else:
            self._row = {"step": int(step), "time": time.time(), **values}
            self._jsonl.write(json.dumps(self._row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def write_videos(self, step: int, videos: dict, fps: float) -> None:
        """`videos`: tag -> uint8 or [-1, 1] float [T, H, W, 3]; each an animated image at `step`."""
        if not self._enabled or self._tb is None:
            return
        for tag, video in videos.items():
            frames = np.asarray(video)
            height, width = frames.shape[1:3]
            image = Summary.Image(height=height, width=width, colorspace=3,
                                  encoded_image_string=gif_bytes(frames, fps))
            self._tb.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]),
                                             step)
        self._tb.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


class _Appender:
    """A text file appended line by line and flushed: a local file opened in append mode; on an
    object store (gs://, no append) the object is rewritten whole at each flush. The last line
    written can be replaced (`replace_last`)."""

    def __init__(self, path):
        self._path = path
        self._remote = runs.is_remote(path)
        if self._remote:
            self._text = path.read_text() if path.exists() else ""
        else:
            self._file = path.open("ab")  # noqa: SIM115 - bytes: offsets to truncate at
        self._last = None  # where the last line written starts (characters / bytes)

    def write(self, text: str) -> None:
        if self._remote:
            self._last = len(self._text)
            self._text += text
        else:
            self._file.flush()
            self._last = self._file.tell()
            self._file.write(text.encode())

    def replace_last(self, text: str) -> None:
        """Replaces the last line written by this appender with `text`."""
        if self._remote:
            self._text = self._text[: self._last] + text
        else:
            self._file.flush()
            self._file.truncate(self._last)  # append mode: the write still goes to the end
            self._file.write(text.encode())

    def flush(self) -> None:
        if self._remote:
            self._path.write_text(self._text)
        else:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if not self._remote:
            self._file.close()


class _EpathEvents:
    """tensorboardX writer factory for remote (object store) event files, through the runs path
    layer."""

    def open(self, path: str):
        return _ObjectEvents(runs.user_path(path))

    def directory_check(self, path: str) -> None:
        runs.user_path(path).mkdir(parents=True, exist_ok=True)


class _ObjectEvents:
    """An event file on an object store, as tensorboardX's own GCS writer keeps it: the bytes in
    memory, the whole object rewritten at each flush. A file object from the path layer would not
    do: gcsfs uploads only at close (or every 5 MiB), so TensorBoard would see nothing during
    training, and its file has a `fileno` that raises, which tensorboardX's flush calls for
    os.fsync. This object has no `fileno`, so tensorboardX does not fsync it."""

    def __init__(self, path):
        self._path = path
        self._data = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._data.write(data)

    def flush(self) -> None:
        self._path.write_bytes(self._data.getvalue())

    def close(self) -> None:
        self.flush()


def gif_bytes(video: np.ndarray, fps: float) -> bytes:
    """An animated GIF (looping) of `video` [T, H, W, 3], uint8 or float in [-1, 1]."""
    frames = np.asarray(video)
    if frames.dtype != np.uint8:
        frames = np.round((np.clip(frames, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, int(round(1000.0 / max(fps, 1e-3)))))
    return buf.getvalue()


def _scalar(value):
    value = np.asarray(jax.device_get(value))
    if value.dtype == bool:
        return bool(value)
    return float(value) if value.dtype.kind == "f" else int(value)


def read_metrics(workdir: str) -> list[dict]:
    """All JSON lines written so far (a truncated last line from a crash is ignored)."""
    path = runs.metrics_path(workdir)
    rows = []
    if path.exists():
        with path.open() as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def drop_rows_after(workdir: str, step: int) -> int:
    """Removes the rows of steps after `step` (those a resume from `step` replays), rewriting
    metrics.jsonl atomically so it keeps one row per step; returns how many were dropped."""
    path = runs.metrics_path(workdir)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if int(row.get("step", 0)) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        if runs.is_remote(path):  # an object write is already atomic
            path.write_text("".join(keep))
        else:
            tmp = path.parent / (path.name + ".tmp")
            tmp.write_text("".join(keep))
            tmp.replace(path)
    return len(lines) - len(keep)
