"""``sft prepare``: seed 004's sources (or local files in their schema, or users' canonical JSONL) ->
``instruct_data.jsonl``, ``tool_data.jsonl``, ``reasoning_data.jsonl``.

Resumable: each source is converted into ``parts/<stage>/<source>.jsonl`` and recorded in
``parts/<stage>/<source>.done.json`` with the fingerprint of its inputs (source, local file
identity, limit); a rerun skips the parts already done and only merges again. The merge
deduplicates exact records across a stage's sources (sha256 of the canonical JSON) and writes
the stage file under a temporary name, renamed when whole.

A row that does not convert is counted under its source and reported with its row number (the
first few per source in the table, all counts in ``report.json``); it never stops the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from training.atomic import atomic_path, atomic_write_json, remove_stale_temporaries
from training.heartbeat import Heartbeat
from training.sft.records import STAGE_FILES, STAGE_OF_KIND, STAGES, RecordError, record_kind, to_messages
from training.sft.sources import SOURCES, Source, find_source, find_source_error, iter_rows

MAX_EXAMPLES_SHOWN = 3


class PrepareError(ValueError):
    """Bad flags or unreadable inputs; the message is one line naming the flag or file."""


@dataclass
class SourceReport:
    source: str
    stage: str
    rows: int = 0
    records: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)  # "<where>: reason" of the first malformed rows
    seconds: float = 0.0
    skipped: bool = False  # done by an earlier run with the same inputs

    def bad(self, where: str, reason: str) -> None:
        """Count a malformed row; ``where`` is ``file:line`` (1-based) for a file, ``source row N`` for the hub."""
        self.malformed += 1
        if len(self.examples) < MAX_EXAMPLES_SHOWN:
            self.examples.append(f"{where}: {reason}")


@dataclass
class PrepareOptions:
    out_dir: Path
    stages: list[str]
    limits: dict[str, int | None]
    local: dict[str, dict[str | None, str]] = field(default_factory=dict)  # source name -> {config: path}
    user_files: dict[str, list[str]] = field(default_factory=dict)  # stage -> canonical JSONL files
    hub: bool = True  # False: read only the local files given
    cache_dir: str | None = None


def parse_source_flags(items: list[str]) -> dict[str, dict[str | None, str]]:
    """``--source NAME[/CONFIG]=PATH`` -> {hub id: {config: path}}."""
    out: dict[str, dict[str | None, str]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise PrepareError(f"--source {item!r}: expected NAME=PATH (for example gsm8k=gsm8k.parquet)")
        config = None
        try:
            source = find_source(name)
        except KeyError:
            base, _, config = name.rpartition("/")
            try:
                source = find_source(base)
            except KeyError:
                raise PrepareError(f"--source {item!r}: {find_source_error(name)}") from None
            if config not in source.configs:
                raise PrepareError(f"--source {item!r}: {source.name} has no config {config!r} (configs: {', '.join(map(str, source.configs))})")
        if not Path(path).is_file():
            raise PrepareError(f"--source {item!r}: {path} is not a file")
        out.setdefault(source.name, {})[config] = path
    return out


def parse_file_flags(items: list[str]) -> dict[str, list[str]]:
    """``--file STAGE=PATH`` (users' own canonical JSONL) -> {stage: [paths]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        stage, sep, path = item.partition("=")
        if not sep or stage not in STAGES:
            raise PrepareError(f"--file {item!r}: expected STAGE=PATH with STAGE one of {', '.join(STAGES)}")
        if not Path(path).is_file():
            raise PrepareError(f"--file {item!r}: {path} is not a file")
        out.setdefault(stage, []).append(path)
    return out


def _identity(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _safe(name: str) -> str:
    return name.replace("/", "__")


@contextlib.contextmanager
def _hub_errors(source: Source) -> Iterator[None]:
    """A hub source that cannot be fetched (offline, no network, not cached) is one line naming it and
    the ways around it, not ``datasets``' traceback."""
    try:
        yield
    except ConnectionError as exc:
        offline = "offline" in str(exc).lower() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        why = "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the Hugging Face cache" if offline else "cannot reach the Hugging Face Hub"
        raise PrepareError(f"{source.stage} source {source.name}: {why}; run once online, or read local copies "
                           f"with --source {source.name}=FILE or your own --file {source.stage}=FILE and --no-hub") from None


def _convert_source(source: Source, opts: PrepareOptions, cap: int | None, part: Path, report: SourceReport) -> None:
    local = opts.local.get(source.name)
    configs = source.configs if local is None else [c for c in source.configs if c in local or (None in local and len(source.configs) == 1)]
    per_config = None if cap is None else math.ceil(cap / max(1, len(configs)))
    heartbeat = Heartbeat("sft-data", "rows")  # boot.sh's watchdog: a hub stream that stalls is a hang
    with atomic_path(part) as tmp, open(tmp, "w", encoding="utf-8") as fh, _hub_errors(source):
        for label, row, data in iter_rows(source, local, per_config, opts.cache_dir):
            report.rows += 1
            heartbeat.beat(report.rows)
            try:
                record = source.convert(data)
                to_messages(record)  # the converter's output must be a valid canonical record
            except RecordError as exc:
                report.bad(f"{label} row {row}", str(exc))
                continue
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            report.records += 1


def _convert_user_file(path: str, stage: str, part: Path, report: SourceReport) -> None:
    """A user's canonical JSONL, kept as it is: only records of this stage's shapes that validate."""
    with open(path, encoding="utf-8") as src, atomic_path(part) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row, line in enumerate(src, 1):
            if not line.strip():
                continue
            report.rows += 1
            try:
                record = json.loads(line)
                kind = record_kind(record)
                if STAGE_OF_KIND[kind] != stage:
                    raise RecordError(f"a {STAGE_OF_KIND[kind]} record in the {stage} file")
                to_messages(record)
            except json.JSONDecodeError as exc:
                report.bad(f"{path}:{row}", f"not JSON ({exc.msg})")
                continue
            except RecordError as exc:
                report.bad(f"{path}:{row}", str(exc))
                continue
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            report.records += 1


def prepare(opts: PrepareOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Convert, merge and deduplicate every requested stage; returns the report (also ``report.json``)."""
    unknown = [s for s in opts.stages if s not in STAGES]
    if unknown:
        raise PrepareError(f"--stages: {', '.join(unknown)} unknown (expected {', '.join(STAGES)})")
    for name in opts.local:
        if find_source(name).stage not in opts.stages:
            raise PrepareError(f"--source {name}: a {find_source(name).stage} source, but --stages is {' '.join(opts.stages)}")
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"stages": {}, "sources": []}
    for stage in opts.stages:
        limit = opts.limits.get(stage)
        sources = [s for s in SOURCES if s.stage == stage and (opts.hub or s.name in opts.local)]
        files = opts.user_files.get(stage, [])
        inputs = len(sources) + len(files)
        if inputs == 0:
            raise PrepareError(f"--stages {stage}: no inputs (--no-hub needs --source or --file for it)")
        cap = None if limit is None else math.ceil(limit / inputs)
        parts_dir = opts.out_dir / "parts" / stage
        parts_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parts_dir)  # a killed run's half-written parts; only whole ones carry a .done.json
        parts = []
        jobs: list[tuple[str, dict[str, Any], Callable[[Path, SourceReport], None]]] = [
            (s.name, {"source": s.name, "local": {str(k): _identity(v) for k, v in (opts.local.get(s.name) or {}).items()},
                      "cap": cap}, lambda part, rep, s=s: _convert_source(s, opts, cap, part, rep)) for s in sources]
        jobs += [(f"file:{Path(f).name}", {"file": _identity(f)}, lambda part, rep, f=f: _convert_user_file(f, stage, part, rep))
                 for f in files]
        for name, inputs_fp, run in jobs:
            part = parts_dir / f"{_safe(name)}.jsonl"
            marker = parts_dir / f"{_safe(name)}.done.json"
            fp = hashlib.sha256(json.dumps(inputs_fp, sort_keys=True).encode()).hexdigest()
            done = json.loads(marker.read_text()) if marker.exists() else None
            if done is not None and done.get("fingerprint") == fp and part.exists():
                report = SourceReport(**{**done["report"], "skipped": True})
            else:
                report = SourceReport(name, stage)
                start = time.monotonic()
                try:
                    run(part, report)
                except (ValueError, OSError) as exc:  # a local file `datasets` cannot parse; names the file
                    raise PrepareError(str(exc)) from None
                report.seconds = time.monotonic() - start
                atomic_write_json(marker, {"fingerprint": fp, "inputs": inputs_fp, "report": report.__dict__})
            cap_note = "" if cap is None else f" (cap {cap})"
            rate = f", {report.rows / report.seconds:,.0f} rows/s" if report.seconds > 0 and not report.skipped else ""
            say(f"sft prepare: {stage} <- {name}: {report.records:,} records from {report.rows:,} rows, "
                f"{report.malformed:,} malformed{cap_note}{rate}" + (" (done earlier, skipped)" if report.skipped else ""))
            for example in report.examples:
                say(f"sft prepare:   malformed: {example}")
            summary["sources"].append(report.__dict__)
            parts.append(part)
        usable = [r for r in summary["sources"] if r["stage"] == stage]
        if not any(r["records"] for r in usable):
            rows = sum(r["rows"] for r in usable)
            first = next((e for r in usable for e in r["examples"]), None)
            raise PrepareError(f"--stages {stage}: no usable record in {rows:,} rows of {', '.join(r['source'] for r in usable)}"
                               + (f" (first: {first})" if first else "") + "; nothing to fine-tune on")
        summary["stages"][stage] = _merge(parts, opts.out_dir / STAGE_FILES[stage], limit)
        s = summary["stages"][stage]
        say(f"sft prepare: {stage}: {s['records']:,} records -> {opts.out_dir / STAGE_FILES[stage]} "
            f"({s['duplicates']:,} duplicates dropped)")
    atomic_write_json(opts.out_dir / "report.json", summary)
    return summary


def _merge(parts: list[Path], out: Path, limit: int | None) -> dict[str, int]:
    seen: set[bytes] = set()
    records = duplicates = 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for part in parts:
            with open(part, encoding="utf-8") as src:
                for line in src:
                    if limit is not None and records >= limit:
                        break
                    key = hashlib.sha256(json.dumps(json.loads(line), sort_keys=True).encode()).digest()
                    if key in seen:
                        duplicates += 1
                        continue
                    seen.add(key)
                    fh.write(line)
                    records += 1
    return {"records": records, "duplicates": duplicates}
