"""Run metrics: JSON lines (`metrics.jsonl`) and TensorBoard event files in the workdir.

Only process 0 writes; other processes get a writer that drops everything, so callers never branch.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


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

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


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


def drop_rows_after(workdir: str, step: int) -> int:
    """Removes the rows of steps after `step` (those a resume from `step` replays), rewriting
    metrics.jsonl atomically so it keeps one row per step; returns how many were dropped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if int(row.get("step", 0)) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    return len(lines) - len(keep)
