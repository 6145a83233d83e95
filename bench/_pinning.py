"""Holds a benchmark process to `--threads` CPU cores, for JAX and for the torch it compares with.

Imported by the comparing benches before jax: XLA reads its flags when jax is first imported. The
flags size XLA's thread pools, but XLA:CPU still runs independent ops on other cores (a "1-thread"
JAX matmul measured 151 GFLOP/s unpinned, 74 pinned), so the process, and the torch subprocesses
it starts, is also pinned to that many cores: both sides get the same CPUs.
"""

from __future__ import annotations

import os
import sys


def threads_flag(argv) -> int:
    """--threads N from argv (1 if absent)."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return 1


def pin_to_threads(argv=None) -> int:
    """Sets XLA's CPU threads and this process's cores to --threads; returns that count."""
    threads = threads_flag(sys.argv if argv is None else argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               f"{'true' if threads > 1 else 'false'} "
                               f"intra_op_parallelism_threads={threads}")
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    return threads
