"""A training run's hold on its workdir: created writable, one training at a time.

The lock is an advisory `flock` on `<workdir>/train.lock`, taken by the main process of a
training (process 0 of a multi-host run) before it reads the checkpoint it resumes and
held until it exits. The kernel drops it when the holder dies, `kill -9` included (on NFS
the server drops it when the holder's lease runs out), so it never stays stuck. The file
holds the holder's pid, host, start time and command line while it is held, for the
error a second training prints. Sampling and evaluation never take it.
"""

import datetime
import fcntl
import json
import os
import socket
import sys

from core.errors import UserError

LOCK_FILE = "train.lock"


def make_writable(workdir: str) -> None:
    """Create `workdir` (and its parents); a path that cannot be written is a UserError."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to workdir {workdir}: {e.strerror or e}") from None


class WorkdirLock:
    """`with WorkdirLock(workdir):` one training of `workdir` at a time (see module doc)."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.workdir, self.enabled, self._fd = workdir, enabled, None

    def __enter__(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write to workdir {self.workdir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"{self.workdir} is being trained by another process ({holder}); wait for it "
                "to finish, or train in another workdir"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(getattr(sys, "orig_argv", sys.argv)),  # with `-m scripts.x`
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no stale holder once released
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "it has not recorded itself yet"
    return (
        f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}: "
        f"{info.get('command')}"
    )
