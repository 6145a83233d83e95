"""`vdit train-vae` stops a diverged run as `vdit train` does: after `train.max_bad_steps`
non-finite steps in a row, naming the step and the last finite loss, with no checkpoint of a
non-finite step."""

import numpy as np
import pytest
from test_vae_train import CONFIG, TINY

from vdit.config import load_config
from vdit.runs import checkpoint
from vdit.train import vae_loop
from vdit.train.step_loop import NonFiniteError


def test_train_vae_stops_after_max_bad_steps_without_saving_them(tmp_path, monkeypatch):
    real = vae_loop.batch_for_step

    def nan_from_step_3(data, cfg, step, offset=0):  # step is 0-based: steps 3.. see NaN pixels
        video = real(data, cfg, step, offset)
        return np.full_like(video, np.nan) if offset == 0 and step >= 2 else video

    monkeypatch.setattr(vae_loop, "batch_for_step", nan_from_step_3)
    # Single images compile fastest. A checkpoint is due at every step: steps 3 and 4 (non-finite)
    # must still not be saved.
    config = load_config(CONFIG, TINY + [
        "--config.vae_train.shapes=[(1, 16, 16)]", "--config.vae_train.steps=8",
        "--config.checkpoint.every=1", "--config.checkpoint.keep=10", "--config.train.max_bad_steps=3"])
    with pytest.raises(NonFiniteError, match=r"^step 5: 3 consecutive steps with a non-finite loss"
                       r".*max_bad_steps=3; last finite loss [0-9.e+-]+ at step 2\)") as error:
        vae_loop.train_vae(config, str(tmp_path))
    assert error.value.exit_code == 3  # `vdit train-vae` exits with it, as `vdit train` does
    manager = checkpoint.make_manager(str(tmp_path), config.checkpoint, with_data=False)
    assert sorted(manager.all_steps()) == [1, 2]
