"""`vdit train-vae` on a tiny VAE: it steps, logs PSNR, checkpoints, resumes where it stopped."""

import os

import numpy as np
import pytest

from vdit.config import load_config
from vdit.runs import checkpoint
from vdit.train.loop import check_resume_compatible
from vdit.train.metrics import read_metrics
from vdit.train.vae_loop import train_vae

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_vae.py")
# No residual blocks, images only: the loop (steps, PSNR, checkpoint, resume) is under test, not
# the VAE (tests/test_vae.py); the VAE's compile is most of this test's time (a 5-frame clip's
# causal chunks nearly doubled it). Video batches train in tests/test_remote_paths.py and the
# quickstart notebook.
TINY = ["--config.vae.base_dim=8", "--config.vae.num_res_blocks=0",
        "--config.vae_train.batch_size=2", "--config.vae_train.shapes=[(1, 16, 16)]",
        "--config.vae_train.log_every=1", "--config.vae_train.eval_examples=2",
        "--config.train.progress=False", "--config.train.tensorboard=False", "--config.checkpoint.every=2",
        "--config.checkpoint.async_save=False", "--config.optim.warmup_steps=0"]


def test_train_vae_steps_checkpoints_and_resumes(tmp_path):
    workdir = str(tmp_path)
    first = train_vae(load_config(CONFIG, TINY + ["--config.vae_train.steps=2"]), workdir)
    assert [h["step"] for h in first["history"]] == [1, 2]
    assert all(np.isfinite(h["psnr"]) for h in first["history"]) and np.isfinite(first["eval_psnr"])
    second = train_vae(load_config(CONFIG, TINY + ["--config.vae_train.steps=3"]), workdir)
    assert [h["step"] for h in second["history"]] == [3]
    rows = read_metrics(workdir)
    assert any("eval/psnr" in r for r in rows) and any("psnr" in r for r in rows)
    # A finished run rerun (a requeued job) trains nothing and adds no second row for its step.
    third = train_vae(load_config(CONFIG, TINY + ["--config.vae_train.steps=3"]), workdir)
    assert third["history"] == [] and third["eval_psnr"] == pytest.approx(second["eval_psnr"])
    assert read_metrics(workdir) == rows
    # A DiT config on this VAE run's workdir is refused as the wrong kind of run.
    dit = load_config(os.path.join(os.path.dirname(CONFIG), "shapes_dit.py"))
    with pytest.raises(ValueError, match=r"holds a VAE run .*but this command trains a DiT run"):
        check_resume_compatible(checkpoint.load_params(workdir)[1], dit)

