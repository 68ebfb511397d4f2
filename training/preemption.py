"""Stopping on SIGTERM/SIGINT within a step, with every rank stopping at the same point.

RunPod gives a spot pod about 5 s between SIGTERM and SIGKILL, and one optimizer step of a 4B run
(hundreds of micro-batches) takes tens of seconds, so the flag is checked between micro-batches. A
step cut short is abandoned: its partial gradients are dropped, and the checkpoint holds the state
at the last completed step (with the data position of that step's start), so a resumed run redoes
the step and follows the same loss curve.

Ranks must abandon at the same micro-batch (under FSDP every micro-batch runs collectives). Each
rank posts its flag to an asynchronous host-side (gloo) all-reduce at one micro-batch boundary and
reads the agreed value at the next: all ranks read the same value at the same boundary, the
reduction has had a whole micro-batch to finish, and the GPU is never synchronised for it.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from training.distributed import Dist


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag (a second SIGINT aborts at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum, self.received_at = signum, time.monotonic()

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): no signal handling
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MicroStepAgreement:
    """Asks, between micro-batches, whether every rank should abandon the current step."""

    def __init__(self, dist: Dist, flag: StopFlag) -> None:
        self.dist, self.flag = dist, flag
        self._pending: Any = None

    def should_abandon(self) -> bool:
        """Call before each micro-batch after the first; the same answer on every rank."""
        if self.dist.world_size == 1:
            return self.flag.raised
        agreed = self._pending is not None and self.dist.read_flag(self._pending)
        self._pending = None if agreed else self.dist.post_flag(self.flag.raised)
        return agreed

    def finish_step(self) -> None:
        """Drain the last posted flag (the end-of-step agreement covers it)."""
        if self._pending is not None:
            self.dist.read_flag(self._pending)
            self._pending = None
