"""`train.init_from=<workdir>` pins that run's newest readable step (vdit/train/init_from.py): a
newest step that does not read is named and skipped, as resuming and sampling do."""

import logging
import os

import jax.numpy as jnp
import pytest
from train_testing import tiny_config

from vdit.runs import checkpoint
from vdit.train import init_from


def _source_run(workdir: str, steps) -> None:
    config = tiny_config("shapes_dit", "unused")
    manager = checkpoint.make_manager(workdir, config.checkpoint, with_data=False)
    for step in steps:
        w = {"dit": {"w": jnp.full((4,), float(step))}}
        checkpoint.save(manager, step, {"step": step, "params": w, "ema": w}, config, force=True)
    manager.wait_until_finished()
    manager.close()


def _truncate_data(folder: str) -> int:
    """Halves every array data file under `folder` (a damaged copy); returns how many."""
    count = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if os.path.basename(root) == "d":  # TensorStore's data files
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                count += 1
    return count


def test_init_from_workdir_skips_an_unreadable_newest_step(tmp_path, caplog, capsys):
    src = str(tmp_path / "src")
    _source_run(src, (2, 4))
    state = os.path.join(src, "checkpoints", "4", "state")
    assert _truncate_data(state) > 0
    config = tiny_config("shapes_dit", "unused", f"--config.train.init_from={src}")
    with caplog.at_level(logging.WARNING, logger=init_from.__name__):
        pinned, read = init_from.pin(config, None)
    assert pinned.train.init_from == os.path.join(src, "checkpoints", "2")
    assert f"checkpoint step 4 in {src}/checkpoints is unreadable" in capsys.readouterr().err
    assert "its newest step 4 does not read" in caplog.text and "pinned at step 2" in caplog.text
    assert float(read[0]["dit"]["w"][0]) == 2.0  # what pin read to know: the run's weights
    assert read[1]["train"]["steps"] == config.train.steps  # and the source's config


def test_init_from_workdir_without_checkpoints_is_named(tmp_path):
    config = tiny_config("shapes_dit", "unused", f"--config.train.init_from={tmp_path}")
    with pytest.raises(FileNotFoundError, match="'train.init_from'.*no checkpoints/"):
        init_from.pin(config, None)
