"""A progress heartbeat for the pod's watchdog (infra/boot.sh).

Each long stage calls :meth:`Heartbeat.beat` as it advances: the sharder with documents written,
the tokenizer with bytes sampled and bytes encoded, the trainer with steps. When ``RUN_HEARTBEAT``
names a file, a beat replaces that file with one JSON line (stage, unit, progress, time); boot.sh
kills a stage whose heartbeat stops changing for longer than the stage's limit, so a hung stream,
tokenization or NCCL collective stops billing. Without ``RUN_HEARTBEAT`` (any run outside boot.sh)
a beat does nothing.

It lives in ``training`` because the sharder imports ``training`` and never the orchestrator: this
is the lowest package every stage can reach. A beat is cheap: at most one small write every
``EVERY_S`` seconds, written beside the file and renamed over it (the watchdog never reads half a
line), without fsync (a beat lost in a power cut costs nothing).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from training.atomic import TMP_PREFIX

ENV = "RUN_HEARTBEAT"
EVERY_S = 2.0


class Heartbeat:
    """The heartbeat of one stage; ``enabled=False`` (e.g. a rank other than 0) makes it silent."""

    def __init__(self, stage: str, unit: str, *, enabled: bool = True, every_s: float = EVERY_S) -> None:
        target = os.environ.get(ENV, "").strip()
        self.path = Path(target) if target and enabled else None
        self.stage, self.unit, self.every_s = stage, unit, every_s
        self._last = -math.inf

    def beat(self, progress: int | float) -> None:
        """Record ``progress`` (a running total in ``unit``), unless the last write was too recent."""
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        line = json.dumps({"stage": self.stage, "unit": self.unit, "progress": progress, "time": round(time.time(), 3)})
        tmp = self.path.with_name(f"{TMP_PREFIX}{self.path.name}.{os.getpid()}")
        try:
            tmp.write_text(line + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # never fail a stage over its heartbeat: the watchdog names the stale file instead
