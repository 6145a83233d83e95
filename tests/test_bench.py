"""Benchmarks cannot rot: each bench/*.py runs in its `--quick` mode (tiny sizes, seconds) in a
subprocess and must exit 0 printing JSON lines only."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bench/attention.py and bench/curate.py --quick have their own tests (tests/test_bench_attention.py,
# tests/test_curate_transitions.py).
OWN_TEST = {"attention.py", "curate.py"}
BENCHES = sorted(n for n in os.listdir(os.path.join(ROOT, "bench"))
                 if n.endswith(".py") and not n.startswith("_") and n not in OWN_TEST)


def test_every_bench_is_covered():
    assert {"data.py", "dit.py", "sample.py", "train.py", "vae.py"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_bench_quick(name):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The benchmarks run on the machine's real devices; --quick keeps the suite's cheap compiles.
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count"))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", name), "--quick"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, f"bench/{name} --quick failed:\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, f"bench/{name} --quick printed nothing"
    for line in lines:
        assert isinstance(json.loads(line), dict), f"bench/{name}: not a JSON object: {line}"


def test_pinning_reads_the_threads_flag():
    """bench/_pinning.py (the comparing benches' core pinning, not a bench itself) reads
    --threads as argparse would see it, 1 when absent."""
    spec = importlib.util.spec_from_file_location("_pinning", os.path.join(ROOT, "bench",
                                                                        "_pinning.py"))
    _pinning = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_pinning)  # defines functions only: nothing is pinned
    assert _pinning.threads_flag(["bench/dit.py", "--threads", "3"]) == 3
    assert _pinning.threads_flag(["bench/vae.py", "--quick", "--threads=2"]) == 2
    assert _pinning.threads_flag(["bench/sample.py", "--quick"]) == 1
