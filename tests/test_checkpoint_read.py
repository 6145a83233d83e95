"""Reading a run's weights for use (`checkpoint.load_params`: sampling, export, convert, encode's
VAE, init_from): only the weights asked for, as host arrays, whatever devices saved them."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from train_testing import tiny_config

from vdit.runs import checkpoint

READ_ON_ONE_DEVICE = """
import json, sys
import numpy as np
from vdit.runs import checkpoint
import jax
assert jax.device_count() == 1
ema, saved = checkpoint.load_params(sys.argv[1])
print(json.dumps({k: np.asarray(v).tolist() for k, v in ema["dit"].items()}))
"""


def _pod_run(workdir: str) -> dict:
    """A run saved from a state sharded over all 8 devices, with an optimizer state."""
    mesh = jax.make_mesh((8,), ("fsdp",))
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))
    rng = np.random.default_rng(0)
    ema = {"dit": {"w": rng.normal(size=(16, 3)).astype(np.float32),
                   "b": rng.normal(size=(8,)).astype(np.float32)}}
    on_mesh = lambda tree: jax.tree.map(lambda a: jax.device_put(a, rows), tree)
    state = {"step": 3, "params": on_mesh(jax.tree.map(lambda a: a + 1, ema)), "ema": on_mesh(ema),
             "opt_state": {"mu": on_mesh(ema), "nu": on_mesh(ema)}}
    config = tiny_config("shapes_dit", "unused")
    config.checkpoint.async_save = False
    manager = checkpoint.make_manager(workdir, config.checkpoint, with_data=False)
    checkpoint.save(manager, 3, state, config, force=True)
    manager.wait_until_finished()
    manager.close()
    return ema


def test_weights_read_alone_on_host(tmp_path):
    workdir = str(tmp_path / "run")
    ema = _pod_run(workdir)
    got, saved = checkpoint.load_params(workdir)
    assert set(got) == {"dit"} and saved["train"]["steps"] > 0
    for name, want in ema["dit"].items():
        assert type(got["dit"][name]) is np.ndarray
        np.testing.assert_array_equal(got["dit"][name], want)
    raw, _ = checkpoint.load_params(workdir, "params")
    np.testing.assert_array_equal(raw["dit"]["w"], ema["dit"]["w"] + 1)


def test_a_run_saved_on_8_devices_reads_on_one(tmp_path):
    """A run trained on a pod is sampled on one accelerator (a target-less restore refused it:
    "Topology mismatch")."""
    workdir = str(tmp_path / "run")
    ema = _pod_run(workdir)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", READ_ON_ONE_DEVICE, workdir], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for name, want in ema["dit"].items():
        np.testing.assert_array_equal(np.asarray(got[name], np.float32), want)
