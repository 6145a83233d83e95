"""Multi-host start-up and multi-slice mesh errors as the command line reports its others: a
jax.distributed start-up timeout names the command (`vdit train: error: ...`) and is logged in the
run's logs/error.log; a dcn mesh size that the job's slices do not fit names the dcn key."""

import argparse
import os
import threading

import pytest

from vdit import cli, cli_errors
from vdit.parallel import distributed
from vdit.parallel.mesh import make_hybrid_mesh

DIT = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_dit.py")


class _Exited(Exception):
    pass


def _args(**flags):
    base = dict(command="train", coordinator="127.0.0.1:1", num_processes=2, process_id=0,
                distributed="auto", cpu_collectives="none", init_timeout=0.2,
                local_device_ids=None)
    return argparse.Namespace(**(base | flags))


def test_give_up_names_the_command_and_writes_the_error_log(tmp_path, monkeypatch, capsys):
    def fake_exit(code):
        raise _Exited(code)

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    settings = distributed.settings_from_args(_args())
    with pytest.raises(_Exited) as exited:
        distributed._give_up(settings, lambda e: cli_errors.report("train", e, False,
                                                                 str(tmp_path)))
    assert exited.value.args == (1,)
    err = capsys.readouterr().err
    assert err.startswith("vdit train: error: process 0 waited at coordinator 127.0.0.1:1"), err
    log = (tmp_path / "logs" / "error.log").read_text()
    assert "vdit train" in log and "process 1 of --num_processes=2 did not join" in log


def test_a_start_up_timeout_from_the_flags_reaches_give_up_with_the_command(tmp_path,
                                                                           monkeypatch, capsys):
    """The command line hands its error path to the watchdog (jax's initialize is replaced by
    one that blocks until the watchdog fires, as a missing process makes it)."""
    fired, codes = threading.Event(), []

    def fake_exit(code):
        codes.append(code)
        fired.set()

    def blocked(**kwargs):
        fired.wait(30)
        raise SystemExit("stopped here: the real process has exited")

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", blocked)
    workdir = str(tmp_path)  # an existing run folder (a new one is not created for a log)
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", DIT, "--workdir", workdir, "--coordinator",
                  "127.0.0.1:1", "--num_processes", "2", "--process_id", "0",
                  "--init_timeout", "0.2"])
    assert codes == [1]
    assert capsys.readouterr().err.startswith("vdit train: error: process 0 waited")
    assert (tmp_path / "logs" / "error.log").is_file()


def test_a_dcn_size_the_job_does_not_have_names_the_key_and_the_slices():
    with pytest.raises(ValueError, match=r"^config.mesh dcn_data=2 needs 2 slices \(processes\), "
                                         r"this job has 1$"):
        make_hybrid_mesh({"fsdp": -1}, {"data": 2})
