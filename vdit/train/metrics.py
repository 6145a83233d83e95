"""Run metrics: JSON lines (`metrics.jsonl`) and TensorBoard event files in the workdir.

Only process 0 writes; other processes get a writer that drops everything, so callers never branch.
`write_videos` puts videos in TensorBoard as animated GIF images (one tag per video, shown in the
Images dashboard) without moviepy: the GIF is encoded here with Pillow.
"""

from __future__ import annotations

import io
import json
import os
import time

import jax
import numpy as np
from PIL import Image
from tensorboardX.proto.summary_pb2 import Summary


class MetricsWriter:
    def __init__(self, workdir: str, tensorboard: bool = True):
        self._enabled = jax.process_index() == 0
        self._tb = None
        if not self._enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self._enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
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
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows
