"""Which training config an experiment's name implies: ``runpod-2b`` -> ``configs/runpod_2b.yaml``.

Seed 002 names experiments after their model (``runpod-1b``, ``runpod-2b``); ``orchestrate
--experiment`` and ``orchestrate pod create --experiment`` both read the name the same way, so the
1B config never trains under a 2B name by default (issue 24).
"""

from __future__ import annotations

import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_RUNPOD_EXPERIMENT = re.compile(r"runpod-\d+b")
_SIZE = re.compile(r"(?:^|[-_])(\d+(?:\.\d+)?[mb])(?:$|[-_])", re.IGNORECASE)


def model_size(name: str) -> str | None:
    """``runpod-2b`` / ``runpod_2b`` / ``dense_75m`` -> ``2B`` / ``75M``; None when the name has no size."""
    match = _SIZE.search(name)
    return match.group(1).upper() if match else None


def named_config(experiment: str | None) -> str | None:
    """``configs/runpod_2b.yaml`` for experiment ``runpod-2b``, when that file exists (seed 002's names)."""
    if not experiment or not _RUNPOD_EXPERIMENT.fullmatch(experiment):
        return None
    candidate = Path("configs") / f"{experiment.replace('-', '_')}.yaml"
    return str(candidate) if candidate.exists() or (PROJECT_ROOT / candidate).exists() else None
