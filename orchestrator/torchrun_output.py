"""torchrun's stderr as a user of `orchestrate` should see it: the trainer's lines only.

When a rank fails, torchrun logs which processes it signalled, then raises ``ChildFailedError``
with its own traceback and a failure table, and exits 1 whatever the rank's code was. The trainer
has already printed its one-line error (once, on rank 0), so orchestrate drops torchrun's report,
keeps everything the ranks wrote (a real crash's traceback included) and returns the exit code
of the root-cause rank from the table: 2 for bad data, as without torchrun.
"""

from __future__ import annotations

import re
from typing import IO, Callable

_AGENT_LOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ \d+ \S*torch/distributed/")  # path relative or site-packages
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
_LOOKAHEAD = 6  # lines of a traceback read before deciding whose it is


class TorchrunFilter:
    """Feed it stderr lines; it writes the ranks' lines on and remembers the root cause's code."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.exit_code: int | None = None
        self._held: list[str] = []
        self._report = False  # inside torchrun's own traceback and failure table
        self._root_cause = False

    def feed(self, line: str) -> None:
        if self._report:
            self._read_report(line)
        elif _AGENT_LOG.match(line):
            return
        elif line.startswith("Traceback (most recent call last):"):
            self.flush()  # a traceback held before this one was a rank's
            self._held = [line]
        elif self._held:
            self._held.append(line)
            if "torch/distributed/run.py" in line:
                self._held, self._report = [], True
            elif "<frozen runpy>" not in line or len(self._held) > _LOOKAHEAD:
                self.flush()  # a frame of the ranks' own code: not torchrun's traceback
        else:
            self.write(line)

    def _read_report(self, line: str) -> None:
        if line.startswith("Root Cause"):
            self._root_cause = True
        elif self._root_cause and self.exit_code is None and (m := _EXITCODE.match(line)):
            code = int(m.group(1))
            self.exit_code = 128 - code if code < 0 else code  # -15 (killed by SIGTERM) -> 143

    def flush(self) -> None:
        for held in self._held:
            self.write(held)
        self._held = []


def filter_stream(stream: IO[str], write: Callable[[str], None]) -> int | None:
    """Copy ``stream`` through a TorchrunFilter until EOF; the root-cause exit code, if any."""
    filt = TorchrunFilter(write)
    for line in stream:
        filt.feed(line)
    filt.flush()
    return filt.exit_code

