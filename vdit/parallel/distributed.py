"""Multi-host start-up: `jax.distributed.initialize` from command-line flags or the cluster.

Every config-taking command accepts (`add_distributed_flags`):
  --coordinator HOST:PORT --num_processes N --process_id I   explicit (any cluster, or one machine)
  --distributed auto|on|off   auto (default): initialise when the flags above are given or the
                              environment names a multi-process job (JAX_COORDINATOR_ADDRESS, SLURM
                              with more than one task, Open MPI, multi-host TPU variables); on:
                              always, letting JAX detect the rest (TPU VM metadata, SLURM, ...);
                              off: never (one process).
  --local_device_ids 0,1      the accelerators this process drives (several processes per host)
  --cpu_collectives gloo|mpi|none   cross-process collectives of the CPU backend (tests, CPU runs)
  --init_timeout SECONDS      give up start-up when the processes have not all joined by then
                              (default 60): one line naming the missing processes, exit 1

`initialize_from_args(args, report)` must run before anything touches a JAX backend; a start-up
timeout goes to `report` (the command line reports it as its other errors: `vdit COMMAND: error:
...` and the run's `logs/error.log`). After it,
`jax.devices()` lists every process's devices, so `vdit.parallel.mesh.make_mesh` /
`mesh_from_config` build the global mesh, each process feeds its own rows
(`jax.make_array_from_process_local_data`) and only process 0 writes logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping

import jax

log = logging.getLogger(__name__)
MODES = ("auto", "on", "off")
CPU_COLLECTIVES = ("gloo", "mpi", "none")
DEFAULT_INIT_TIMEOUT = 60.0
# JAX's own start-up deadline is later than ours: its expiry aborts the process with a C++ trace.
JAX_TIMEOUT_MARGIN = 30


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    mode: str = "auto"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_collectives: str = "gloo"
    init_timeout: float = DEFAULT_INIT_TIMEOUT


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """Adds the multi-host flags (module doc) to a command's parser."""
    g = parser.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0's coordinator service")
    g.add_argument("--num_processes", "--num-processes", type=int, metavar="N",
                   help="number of processes in the job")
    g.add_argument("--process_id", "--process-id", type=int, metavar="I",
                   help="this process's index, 0..N-1")
    g.add_argument("--local_device_ids", "--local-device-ids", metavar="IDS",
                   help="comma-separated local accelerator ids this process uses")
    g.add_argument("--distributed", choices=MODES, default="auto",
                   help="initialise jax.distributed: auto (flags or cluster env), on, off")
    g.add_argument("--cpu_collectives", "--cpu-collectives", choices=CPU_COLLECTIVES,
                   default="gloo", help="CPU cross-process collectives (multi-process CPU runs)")
    g.add_argument("--init_timeout", "--init-timeout", type=float, default=DEFAULT_INIT_TIMEOUT,
                   metavar="SECONDS", help="seconds to wait for every process to join (default 60)")


def settings_from_args(args) -> DistributedSettings:
    """Flags -> validated settings; errors name the flag and the expected form."""
    get = lambda name, default=None: getattr(args, name, default)
    ids = get("local_device_ids")
    settings = DistributedSettings(
        mode=get("distributed", "auto") or "auto", coordinator=get("coordinator"),
        num_processes=get("num_processes"), process_id=get("process_id"),
        local_device_ids=_parse_ids(ids) if ids else None,
        cpu_collectives=get("cpu_collectives", "gloo") or "gloo",
        init_timeout=float(get("init_timeout", DEFAULT_INIT_TIMEOUT) or DEFAULT_INIT_TIMEOUT))
    check_settings(settings)
    return settings


def _parse_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(text).split(","))
    except ValueError as e:
        raise ValueError(f"--local_device_ids={text!r}: expected comma-separated ints, "
                         "e.g. 0,1,2,3") from e


def check_settings(s: DistributedSettings) -> None:
    if s.mode not in MODES:
        raise ValueError(f"--distributed={s.mode!r}; expected one of {MODES}")
    if s.cpu_collectives not in CPU_COLLECTIVES:
        raise ValueError(f"--cpu_collectives={s.cpu_collectives!r}; expected {CPU_COLLECTIVES}")
    if s.mode == "off" and s.coordinator is not None:
        raise ValueError("--distributed=off contradicts --coordinator")
    if s.coordinator is not None:
        host, _, port = s.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator={s.coordinator!r}: expected HOST:PORT, "
                             "e.g. 10.0.0.2:8476")
        if s.num_processes is None or s.process_id is None:
            raise ValueError("--coordinator needs --num_processes and --process_id as well")
    if not s.init_timeout > 0:
        raise ValueError(f"--init_timeout={s.init_timeout}: expected a positive number of seconds")
    if s.num_processes is not None and s.num_processes < 1:
        raise ValueError(f"--num_processes={s.num_processes}: expected >= 1")
    if s.process_id is not None and s.num_processes is not None and not (
            0 <= s.process_id < s.num_processes):
        raise ValueError(f"--process_id={s.process_id}: expected 0..{s.num_processes - 1} "
                         f"(--num_processes={s.num_processes})")


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """Names the multi-process job the environment describes, or None (one process)."""
    env = os.environ if environ is None else environ
    count = lambda key: int(env.get(key, "1") or 1)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in env and count("SLURM_NTASKS") > 1:
        return f"SLURM job {env['SLURM_JOB_ID']} ({env['SLURM_NTASKS']} tasks)"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI ({env['OMPI_COMM_WORLD_SIZE']} ranks)"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU multi-slice (MEGASCALE_COORDINATOR_ADDRESS)"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return f"TPU pod ({hosts.count(',') + 1} workers)"
    return None


def should_initialize(s: DistributedSettings, environ: Mapping[str, str] | None = None) -> bool:
    if s.mode == "off":
        return False
    return s.mode == "on" or s.coordinator is not None or detect_cluster(environ) is not None


def initialize(s: DistributedSettings, report: Callable[[Exception], int] | None = None) -> bool:
    """Starts jax.distributed when the settings ask for it; returns whether it is running.
    A start-up timeout is handed to `report` (which says it and returns the exit code)."""
    if jax.distributed.is_initialized():
        return True
    if not should_initialize(s):
        return False
    if s.cpu_collectives != "none":  # read when the CPU client is created: set it before
        jax.config.update("jax_cpu_collectives_implementation", s.cpu_collectives)
    watchdog = threading.Timer(s.init_timeout, _give_up, args=(s, report))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address=s.coordinator,
                                   num_processes=s.num_processes, process_id=s.process_id,
                                   local_device_ids=list(s.local_device_ids)
                                   if s.local_device_ids else None,
                                   initialization_timeout=int(s.init_timeout) + JAX_TIMEOUT_MARGIN)
    finally:
        watchdog.cancel()
    log.info("jax.distributed: %s", describe())
    return True


def missing_message(s: DistributedSettings) -> str:
    """The start-up timeout, in one line naming who did not join (as far as this process knows)."""
    where = f"coordinator {s.coordinator}" if s.coordinator else "the job's coordinator"
    n, me = s.num_processes, s.process_id
    wait = f"within --init_timeout={s.init_timeout:g} s"
    if me is not None and me != 0:
        return (f"process {me} could not join {where} (process 0) {wait}: start process 0 "
                "(or check the address and firewall), or raise --init_timeout")
    if n is not None:
        others = "process 1" if n == 2 else f"processes 1..{n - 1} (some or all)"
        return (f"process 0 waited at {where} {wait}, but {others} of --num_processes={n} did "
                "not join: start them with the same --coordinator and their --process_id, or "
                "raise --init_timeout")
    return (f"jax.distributed start-up did not finish {wait} at {where} ({detect_cluster()}): "
            "some processes of the job did not join; raise --init_timeout if they start late")


def _give_up(s: DistributedSettings, report: Callable[[Exception], int] | None) -> None:
    # jax.distributed.initialize blocks in C++ and cannot be interrupted, so no exception can reach
    # the command line's error path: report from here, then exit the process.
    error = TimeoutError(missing_message(s))
    if report is None:  # a library user's process
        print(f"vdit: error: {error}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(report(error))


def initialize_from_args(args, report: Callable[[Exception], int] | None = None) -> bool:
    """`initialize(settings_from_args(args), report)`: call first thing in a command's handler."""
    return initialize(settings_from_args(args), report)


def describe() -> str:
    """One line: this process, the process count and the devices (local / global)."""
    return (f"process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} local / {jax.device_count()} global "
            f"{jax.devices()[0].platform} devices")
