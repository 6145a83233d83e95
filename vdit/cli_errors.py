"""The command line's one error path: any failure -> one or two lines on stderr and a non-zero exit.

`report(command, error, debug, workdir)` prints `vdit COMMAND: error: MESSAGE`. Errors vdit raises on
purpose (bad input, a locked workdir, a failed save, non-finite loss) carry their whole message;
anything else is named by type and first line, as a bug would be. The traceback is never on the
screen unless `--debug` (or VDIT_DEBUG=1) asks for it; when the command's workdir is an existing
folder it is also written to `<workdir>/logs/error.log`, and the second line says where.

Exit status: 1 for an error, 2 for a command-line usage error (argparse) or a command not built,
3 for a run stopped by non-finite loss, 143 for a run stopped by SIGTERM (preemption) after saving
its checkpoint (an exception may carry its own `exit_code`), 130 for Ctrl-C.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from vdit import runs

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
LOG = "logs/error.log"


def debug_requested(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("VDIT_DEBUG", "") not in ("", "0")


def message(error: BaseException) -> str:
    """The error as one line: its own text for deliberate errors, `Type: first line` otherwise."""
    text = " ".join(str(error).split()) or type(error).__name__
    deliberate = isinstance(error, (ValueError, OSError, NotImplementedError)) or hasattr(
        error, "exit_code") or type(error).__module__.startswith("vdit.")
    if deliberate and not isinstance(error, (KeyError, IndexError, TypeError, AttributeError)):
        return text if len(text) <= 600 else text[:600] + " ..."
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"unexpected {type(error).__name__}: {first}"


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device running out of memory (XLA's RESOURCE_EXHAUSTED / "Out of
    memory allocating N bytes", whatever exception type carries it)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def write_log(workdir: str | None, command: str, error: BaseException) -> str | None:
    """Appends the traceback to <workdir>/logs/error.log when workdir is a folder; its path."""
    try:
        if not workdir or not runs.user_path(workdir).is_dir():
            return None
        path = runs.user_path(workdir) / LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = (f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} vdit {command} (pid {os.getpid()})\n"
                 + "".join(traceback.format_exception(error)))
        # read + rewrite, not append: object stores (gs://) have no append
        path.write_text((path.read_text() if path.exists() else "") + entry)
    except Exception:  # noqa: BLE001 - an unwritable workdir, or a gs:// one without gcsfs: the
        return None     # screen message still names the error
    return path


def report(command: str, error: BaseException, debug: bool, workdir: str | None) -> int:
    """Prints the error (and, with debug, its traceback) and returns the exit status."""
    if isinstance(error, KeyboardInterrupt):
        print(f"vdit {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"vdit {command}: error: {message(error)}", file=sys.stderr)
    log = write_log(workdir, command, error)
    if not debug:
        where = f"the traceback is in {log}; " if log else ""
        print(f"vdit {command}: ({where}rerun with --debug to print the traceback)",
              file=sys.stderr)
    sys.stderr.flush()
    return int(getattr(error, "exit_code", EXIT_ERROR))
