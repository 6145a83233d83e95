"""Test setup: 8 fake CPU devices (so every sharding path runs on a real mesh), float32 matmuls,
cheap compiles."""

import os

# Must happen before jax is imported anywhere in the test session (subprocesses inherit it).
# The suite spends more of its CPU compiling than running (tiny models, a few steps each): LLVM at
# -O0 halves a typical test's compile and leaves the numerics alone (no fast-math at any level).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Identical programs compiled by different tests (a trainer restarted for a resume test, the same
# tiny model in several files) are compiled once per session.
import tempfile  # noqa: E402

# The environment variables carry the same cache to the `vdit`/bench subprocesses tests start
# (a trainer killed and restarted compiles its step once). pytest-xdist workers of one run share
# it too (the run id is common to them), so a program compiled in one worker is not recompiled.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN_ID:
    CACHE_DIR = os.path.join(tempfile.gettempdir(), f"vdit-jax-cache-{_RUN_ID}")
    os.makedirs(CACHE_DIR, exist_ok=True)
else:
    CACHE_DIR = tempfile.mkdtemp(prefix="vdit-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# pytest-xdist runs a file's tests in one worker (`--dist loadfile`) and hands files out in the
# collected order (with `--no-loadscope-reorder`, as `make test` runs). The heaviest files go first
# (longest-processing-time-first), so the run does not end with one worker on a 4-minute file while
# the other idles. Seconds per file from a full `--junitxml` run on 2 cores; other files follow in
# their usual order.
HEAVY_FILES = ("test_docs.py", "test_dry_run.py", "test_bench.py", "test_vae.py", "test_distill.py",
               "test_train_experts.py", "test_plan.py", "test_lora.py", "test_vae_train.py",
               "test_train.py", "test_notebooks.py", "test_remote_paths.py",
               "test_convert_runs.py", "test_attention_block_sparse.py", "test_faults.py",
               "test_kill_resume.py", "test_cli_errors.py", "test_i2v_clip_train.py",
               "test_i2v_train.py", "test_multihost.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FILES)))  # stable
