"""The command line: lists every command, refuses unbuilt ones clearly, rejects bad arguments."""

import subprocess
import sys

import pytest

from vdit import cli


def test_help_lists_design_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("train-vae", "encode", "train", "sample", "curate", "eval", "convert", "plan"):
        assert name in out


def test_unbuilt_command_says_so_and_fails(capsys):
    unbuilt = []
    for name in cli.COMMANDS:
        try:
            cli._handler(name)
        except cli.NotBuiltError:
            unbuilt.append(name)
    for name in unbuilt:
        argv = {"curate": ["curate", "--input", "a", "--output", "b"],
                "convert": ["convert", "--src", "a", "--out", "b"],
                "plan": ["plan"]}.get(name, [name, "--workdir", "w"])
        assert cli.main(argv) == 2
        assert "not built yet" in capsys.readouterr().err


def test_bad_argument_exits_nonzero():
    result = subprocess.run([sys.executable, "-m", "vdit", "sample", "--steps", "many"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "--steps" in result.stderr and "invalid int value" in result.stderr


def test_unknown_command_exits_nonzero():
    result = subprocess.run([sys.executable, "-m", "vdit", "dance"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr
