"""Multi-host training with real processes on one machine: 2 processes x 4 CPU devices (gloo
collectives, jax.distributed from --coordinator/--num_processes/--process_id) train the DiT for 3
steps and end with the same state as 1 process x 8 devices on the same data. Plus the flag and
cluster-environment rules of `vdit.parallel.distributed` and the multi-slice mesh."""

import argparse
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vdit.data import sources
from vdit.models.tokenizers import ByteTokenizer
from vdit.parallel import distributed
from vdit.parallel.mesh import mesh_from_config, split_mesh_config

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3
# Rows = processes and one clip per row (32 tokens), so both layouts see the same global batches.
# Mesh fsdp=2 x sequence=4: weights sharded across the two processes, tokens within each.
OVERRIDES = [
    "--config.model.num_layers=1", "--config.model.num_attention_heads=4",
    "--config.model.attention_head_dim=8", "--config.model.ffn_dim=32",
    "--config.model.text_dim=16", "--config.model.freq_dim=16", "--config.text.d_model=16",
    "--config.text.d_kv=8", "--config.text.d_ff=32", "--config.text.num_layers=1",
    "--config.text.num_heads=2", "--config.text.max_length=32", "--config.text.trainable=False",
    "--config.text.kind=byte",  # the test shards hold byte token ids
    "--config.data.tokens_per_row=32", "--config.data.text_per_row=32",
    "--config.data.rows_per_batch=2", "--config.data.max_segments=1", "--config.data.pack_bins=1",
    "--config.data.prefetch=0", "--config.data.caption_dropout=0.0",
    f"--config.train.steps={STEPS}", "--config.train.progress=False",
    "--config.train.tensorboard=False", "--config.train.log_every=1",
    "--config.optim.warmup_steps=0", f"--config.checkpoint.every={STEPS}",
    "--config.checkpoint.async_save=False", "--config.mesh.data=1", "--config.mesh.fsdp=2",
    "--config.mesh.sequence=4", "--config.train.i2v_rate=0.0",  # the shards carry no I2V latents
    # float32 matmuls: the two layouts sum gradients in different orders, and bfloat16 operands
    # would turn those last-bit differences into 2^-8 roundings of a few values by step 3
    "--config.model.matmul_dtype="]
# Unoptimised CPU code generation: compiles ~3x faster; every run here uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _write_shards(folder: str, channels: int) -> None:
    tok = ByteTokenizer(32)
    rng = np.random.default_rng(0)
    examples = []
    for i in range(12):
        caption = ["a red circle moving left", "a blue square", "green triangle up"][i % 3]
        ids, mask = tok([caption])
        latents = rng.normal(size=(2, 8, 8, channels)).astype(np.float32) + i % 3
        examples.append({"latents": latents, "text": ids[0][: int(mask[0].sum())],
                         "caption": caption})
    sources.write_shard(os.path.join(folder, "latents-00000-of-00001.array_record"), examples)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(workdir: str, devices: int, flags: list[str], log_path: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
    cmd = [sys.executable, os.path.join(HERE, "multihost_worker.py"), "--workdir", workdir,
           "--steps", str(STEPS), *flags, *OVERRIDES,
           f"--config.data.latents_dir={os.path.dirname(workdir)}/latents"]
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _result(proc: subprocess.Popen, log_path: str) -> dict:
    try:
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = open(log_path).read()
    assert proc.returncode == 0, f"worker failed ({log_path}):\n{text[-4000:]}"
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def _state(workdir: str) -> dict:
    """The saved train state as host arrays, whatever mesh wrote it."""
    path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path).item_metadata
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return jax.device_get(checkpointer.restore(path, target))


def test_two_processes_train_like_one(tmp_path):
    _write_shards(str(tmp_path / "latents"), channels=8)  # configs/shapes_dit.py in_channels
    port = _free_port()
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    logs = [str(tmp_path / f"{name}.log") for name in ("p0", "p1", "single")]
    procs = [_spawn(multi, 4, ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                               "--process_id", str(i)], logs[i]) for i in range(2)]
    procs.append(_spawn(single, 8, ["--distributed", "off"], logs[2]))
    results = [_result(p, log) for p, log in zip(procs, logs)]

    for i in range(2):
        assert (results[i]["process"], results[i]["processes"], results[i]["devices"]) == (i, 2, 8)
        assert results[i]["hybrid_slices"] == [[0], [1]]  # dcn axis: one slice per process
    assert results[2]["processes"] == 1 and results[2]["devices"] == 8
    np.testing.assert_allclose(results[0]["losses"], results[2]["losses"], rtol=1e-5)

    got, want = _state(multi), _state(single)
    assert int(got["step"]) == int(want["step"]) == STEPS
    pairs = zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True)
    for (path, g), w in pairs:
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    moments = jax.tree.leaves(got["opt_state"])
    assert max(float(np.abs(np.asarray(m)).max()) for m in moments if np.ndim(m)) > 0


def _args(*argv):
    parser = argparse.ArgumentParser()
    distributed.add_distributed_flags(parser)
    return parser.parse_args(list(argv))


def test_flags_and_environment_detection():
    s = distributed.settings_from_args(_args("--coordinator", "10.0.0.2:8476", "--num-processes",
                                             "4", "--process_id", "3", "--local_device_ids", "0,1"))
    assert (s.coordinator, s.num_processes, s.process_id, s.local_device_ids) == (
        "10.0.0.2:8476", 4, 3, (0, 1))
    assert distributed.should_initialize(s, environ={})
    bad = [(["--coordinator", "nohost"], "expected HOST:PORT"),
           (["--coordinator", "h:1"], "needs --num_processes and --process_id"),
           (["--coordinator", "h:1", "--num_processes", "2", "--process_id", "2"],
            r"--process_id=2: expected 0..1"),
           (["--local_device_ids", "0,x"], "comma-separated ints"),
           (["--distributed", "off", "--coordinator", "h:1", "--num_processes", "1",
             "--process_id", "0"], "contradicts")]
    for argv, message in bad:
        with pytest.raises(ValueError, match=message):
            distributed.settings_from_args(_args(*argv))
    plain = distributed.settings_from_args(_args())
    assert not distributed.should_initialize(plain, environ={"SLURM_JOB_ID": "7",
                                                             "SLURM_NTASKS": "1"})
    for env in ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, {"OMPI_COMM_WORLD_SIZE": "2"},
                {"JAX_COORDINATOR_ADDRESS": "h:1"}, {"TPU_WORKER_HOSTNAMES": "a,b,c,d"},
                {"MEGASCALE_COORDINATOR_ADDRESS": "h"}):
        assert distributed.should_initialize(plain, environ=env), env
    on = distributed.settings_from_args(_args("--distributed", "on"))
    assert distributed.should_initialize(on, environ={})
    assert not distributed.initialize(plain)  # one process here: nothing to start


def test_mesh_from_config_single_process():
    mesh = mesh_from_config({"data": -1, "fsdp": 2, "tensor": 1, "sequence": 1, "dcn_data": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1, "sequence": 1}
    assert split_mesh_config({"fsdp": -1, "dcn_data": 2, "rules": {}}) == ({"fsdp": -1},
                                                                            {"data": 2})
    with pytest.raises(ValueError, match="dcn_data=2 needs 2 slices \\(processes\\), this job has 1"):
        mesh_from_config({"fsdp": -1, "dcn_data": 2})  # one process = one slice
    with pytest.raises(ValueError, match="unknown dcn axes \\['dcn_pipeline'\\]"):
        mesh_from_config({"dcn_pipeline": 2})
