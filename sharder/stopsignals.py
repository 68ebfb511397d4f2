"""SIGINT/SIGTERM handling for a sharder run: stop cleanly at a batch boundary, or abort on a second."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop at the next batch; a second signal aborts at once.

    Stopping at a batch boundary is what keeps the manifest exact; the second signal is the way out
    when the stream blocks (the open shards are then discarded, the manifests stay valid).
    Handlers are installed only from the main thread and restored afterwards.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
