"""Per-rank reports from probes run under torchrun. Two ranks printing to one inherited stdout can
land on one line (CI saw ``{...}PROBE {...}``), so each rank writes its own file, atomically, and the
test reads exactly one file per rank."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_report(folder: Path, rank: int, report: dict) -> None:
    """Rename into place so a reader never sees half a report."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(report))
    os.replace(tmp, folder / f"rank{rank}.json")


def read_reports(folder: Path, world_size: int) -> list[dict]:
    """Every rank's report, in rank order; a missing rank fails with the folder's contents."""
    found = sorted(p.name for p in folder.glob("rank*.json"))
    assert found == [f"rank{r}.json" for r in range(world_size)], found
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world_size)]
