"""One writer per folder: a lock file holding the writer's host and pid.

`FolderLock(path)` (a context manager) creates the file atomically (O_CREAT | O_EXCL). A second
writer finds it and refuses with `LockedError`, naming the holder. A lock whose holder is gone is
stale and taken over with a message: same host and the pid no longer runs (a SIGKILLed run), or
this very process (an earlier call that did not release it). A lock held by another host cannot be
checked from here; the message says which host and pid and to delete the file once that run is
gone. Used by `vdit train`/`train-vae` (workdir/lock, process 0 only) and per curate shard.
Lock files are local (or shared-filesystem) files: the exclusive create needs an OS file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from vdit import runs

log = logging.getLogger(__name__)


class LockedError(RuntimeError):
    """Another live process holds the lock of a folder this process wants to write."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_holder(path: str) -> dict | None:
    """The lock file's {"host", "pid", "since"}, or None when absent or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class FolderLock:
    """Exclusive lock file at `path`; `what` names the guarded thing in messages."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        self._held = False

    def acquire(self) -> FolderLock:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(3):  # a stale lock is removed, then the create is retried
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing(me)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise LockedError(f"could not take the lock {self.path} of {self.what}")

    def _handle_existing(self, me: dict) -> None:
        holder = read_holder(self.path)
        if holder is None:  # a writer is between create and write, or the file is garbage
            age = time.time() - os.path.getmtime(self.path) if os.path.exists(self.path) else 0
            if age < 5:
                time.sleep(0.2)
                holder = read_holder(self.path)
            if holder is None:
                log.warning("%s: removing an unreadable lock file %s", self.what, self.path)
                _remove(self.path)
                return
        host, pid = holder.get("host"), int(holder.get("pid", -1))
        ours = host == me["host"] and pid == me["pid"]
        if host == me["host"] and (ours or not _alive(pid)):
            print(f"vdit: {self.what}: taking over a stale lock {self.path} (pid {pid} on "
                  f"{host} is no longer running)", flush=True)
            _remove(self.path)
            return
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
        hint = ("wait for it to finish or stop it" if host == me["host"] else
                f"if that run is gone, delete {self.path}")
        raise LockedError(f"{self.what} is in use by pid {pid} on {host} (since {since}, lock "
                          f"{self.path}): one writer at a time; {hint}")

    def release(self) -> None:
        if self._held:
            holder = read_holder(self.path)
            if holder and holder.get("pid") == os.getpid():
                _remove(self.path)
            self._held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class NoLock:
    """The lock of a process that does not write (jax process_index > 0)."""

    def __enter__(self) -> NoLock:
        return self

    def __exit__(self, *exc) -> None:
        pass


def workdir_lock(workdir: str, process_index: int = 0, what: str | None = None):
    """The lock of a run folder (workdir/lock), taken by process 0 only. An object store (gs://)
    has no atomic exclusive create through the path layer, so a remote workdir is not locked."""
    if process_index != 0:
        return NoLock()
    if runs.is_remote(workdir):
        log.warning("workdir %s is on an object store: no lock file; run one writer at a time",
                    workdir)
        return NoLock()
    return FolderLock(str(runs.user_path(workdir) / "lock"), what or f"workdir {workdir}")
