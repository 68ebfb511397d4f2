"""Stages with one interface and completion markers (the datatrove pattern).

A stage is a name, the inputs and settings that determine its output (its *fingerprint*), and a
function that does the work and returns a summary (counts, seconds, throughput). The function is
told whether its inputs changed since its last success (then it must start over rather than resume
or reuse). After a stage
succeeds, ``<run>/stages/<name>.json`` records its fingerprint; a re-run whose fingerprint matches
and whose outputs still exist skips it and says so. Once one stage runs, every later stage runs
too (each is idempotent and reuses what it can), so a changed setting redoes exactly the stages
from the first affected one onwards.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from training.atomic import atomic_write_json

STAGE_NAMES = ("layout", "shard", "curate", "tokenizer", "emit", "train")


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Stage:
    name: str
    inputs: dict[str, Any]
    run: Callable[[bool], dict[str, Any]]
    outputs_exist: Callable[[], bool] = lambda: True
    plan: str = ""


@dataclass
class StageRecord:
    name: str
    status: str  # ran | skipped | would run | would skip | failed | not reached
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


class StageFailed(RuntimeError):
    """A stage raised a user error; the message names the stage and the error. Exit code 2 (bad input)
    unless the error carries its own (the trainer's 143 after SIGTERM, 3 on divergence)."""

    def __init__(self, stage: str, message: str, exit_code: int = 2) -> None:
        super().__init__(f"stage {stage} failed: {message}")
        self.stage, self.exit_code = stage, exit_code


def marker_path(stages_dir: Path, name: str) -> Path:
    return stages_dir / f"{name}.json"


def read_marker(stages_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads(marker_path(stages_dir, name).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def run_stages(stages: list[Stage], stages_dir: Path, console: Console, dry_run: bool = False,
               user_errors: tuple[type[BaseException], ...] = ()) -> list[StageRecord]:
    """Run (or, with ``dry_run``, plan) ``stages`` in order; returns one record per stage."""
    records: list[StageRecord] = []
    forced = False
    for stage in stages:
        fp = fingerprint(stage.inputs)
        marker = read_marker(stages_dir, stage.name)
        done = not forced and marker is not None and marker.get("fingerprint") == fp and stage.outputs_exist()
        if dry_run:
            records.append(StageRecord(stage.name, "would skip (done)" if done else "would run", summary={"plan": stage.plan}))
            forced = forced or not done
            continue
        if done:
            console.print(f"[stage] {stage.name}: done earlier with the same inputs, skipped", markup=False)
            earlier = {k: f"earlier run: {v}" for k, v in marker.get("summary", {}).items() if isinstance(v, str)}
            records.append(StageRecord(stage.name, "skipped", 0.0, earlier))
            continue
        forced = True
        why = "first run" if marker is None else ("inputs changed" if marker.get("fingerprint") != fp else "outputs missing")
        console.print(f"[stage] {stage.name}: start ({why}) at {time.strftime('%H:%M:%S')}", markup=False)
        start = time.monotonic()
        try:
            summary = stage.run(marker is not None and marker.get("fingerprint") != fp)
        except user_errors as exc:
            records.append(StageRecord(stage.name, "failed", time.monotonic() - start))
            raise StageFailed(stage.name, str(exc), getattr(exc, "exit_code", 2)) from exc
        seconds = time.monotonic() - start
        atomic_write_json(marker_path(stages_dir, stage.name), {
            "stage": stage.name, "fingerprint": fp, "inputs": stage.inputs, "seconds": seconds,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary,
        })
        rate = summary.get("throughput", "")
        console.print(f"[stage] {stage.name}: done in {seconds:.1f}s" + (f" ({rate})" if rate else ""), markup=False)
        records.append(StageRecord(stage.name, "ran", seconds, summary))
    return records


def summary_table(records: list[StageRecord], title: str) -> Table:
    table = Table(title=title)
    for col in ("stage", "status", "seconds", "result"):
        table.add_column(col, overflow="fold")
    for r in records:
        result = r.summary.get("plan") or r.summary.get("throughput") or r.summary.get("result", "")
        table.add_row(r.name, r.status, f"{r.seconds:.1f}", str(result))
    return table
