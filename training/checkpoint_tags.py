"""Which tags a checkpoint directory holds, and at which step: from file names and headers alone.

Kept apart from training/checkpoint.py, which needs torch, so that the orchestrator can plan its
stages (is there a checkpoint to resume or to fine-tune from?) without importing torch: every
``orchestrate`` command starts about a second sooner. The weights header is read with
``framework="numpy"``, which validates it exactly as the torch framework does.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import safetensors

# A sharded tag (FSDP runs, training/sharded_checkpoint.py) is a folder <tag>.dcp holding DCP's files and podtrain.json.
DCP_SUFFIX = ".dcp"
SHARDED_META = "podtrain.json"
STEP_TAG = re.compile(r"^step(\d+)$")


def list_tags(directory: str | Path) -> list[tuple[int, str]]:
    """(step, tag) of every tag with a weights file, newest first (step tags before best/final at a tie).

    A weights file whose header cannot be read sorts first, so that resuming reports it as broken.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("*.safetensors"):
        tag = path.name[: -len(".safetensors")]
        if tag.startswith("."):
            continue
        try:
            with safetensors.safe_open(str(path), framework="numpy") as fh:
                step = int((fh.metadata() or {}).get("step", -1))
        except Exception:  # unreadable header: rank it first so find_latest reports it, then falls back
            step = sys.maxsize
        found.append((step, 0 if STEP_TAG.match(tag) else 1, tag))
    for path in directory.glob(f"*{DCP_SUFFIX}"):
        tag = path.name[: -len(DCP_SUFFIX)]
        if tag.startswith(".") or not path.is_dir() or any(t == tag for _, _, t in found):
            continue
        try:
            step = int(json.loads((path / SHARDED_META).read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = sys.maxsize
        found.append((step, 0 if STEP_TAG.match(tag) else 1, tag))
    return [(step, tag) for step, _, tag in sorted(found, key=lambda t: (-t[0], t[1], t[2]))]
