"""The two ways a sharder run ends early, as exceptions a caller can tell apart.

``ShardError`` is the user's problem (a bad flag, an unreadable file, a dataset that cannot be
reached): the CLI prints its one-line message and exits 2. ``ShardInterrupted`` is SIGINT or
SIGTERM: the run stopped cleanly, its output directories are consistent, and re-running the same
command resumes. It is deliberately not a ShardError, so a caller that retries on user errors does
not mistake a stop request for one.
"""

from __future__ import annotations

import signal
from typing import Any

EXIT_USER_ERROR = 2


class ShardError(Exception):
    """A user error; the message is one line naming the flag or file and what is wrong."""


class ShardInterrupted(Exception):
    """The run was stopped by a signal after leaving every output directory consistent.

    ``exit_code`` follows the shell convention 128 + signal number (130 for SIGINT, 143 for
    SIGTERM); ``result`` is the ShardResult of the work done before the stop.
    """

    def __init__(self, signum: int, result: Any = None) -> None:
        self.signum = signum
        self.result = result
        super().__init__(f"interrupted by {signal.Signals(signum).name}; re-run the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
