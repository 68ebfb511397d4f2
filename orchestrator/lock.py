"""One ``orchestrate`` per experiment: an exclusive lock on ``runs/<experiment>/.orchestrate.lock``.

Two runs on one workspace and experiment would shard, encode and train over each other, and the
loser fails far from the cause ("missing or empty shards"). ``flock`` is released by the kernel
when its holder dies, so a killed run (spot preemption, kill -9) never leaves a stale lock; the
file only records who holds it (PID, host, start time) for the refusal message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class LockHeld(RuntimeError):
    """Another process holds the experiment; the message names its PID and host."""


class ExperimentLock:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> "ExperimentLock":
        """Take the lock or raise LockHeld; an OSError (unwritable workspace) is left to the caller."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeld(
                f"experiment {self.path.parent.name} is in use by PID {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('since', '?')}); wait for it to finish or stop it "
                f"(lock: {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ExperimentLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
