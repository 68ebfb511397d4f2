"""What a sharder run tells the person watching it: a live progress line and a closing table.

On a terminal the progress is a rich bar; in a pod's log (not a terminal) a rich bar would print
nothing until the end, so a plain line is logged every LOG_EVERY_S seconds instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from training.heartbeat import Heartbeat

LOG_EVERY_S = 30.0


@dataclass
class SplitResult:
    """One output directory after a run: totals in the directory, and what this run added."""

    split: str
    directory: Path
    documents: int
    shards: int
    bytes: int
    text_bytes: int
    new_documents: int
    new_shards: int
    new_text_bytes: int
    seconds: float
    resumed: bool
    complete: bool

    @property
    def docs_per_s(self) -> float:
        return self.new_documents / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Uncompressed text written per second, in MB (10^6 bytes)."""
        return self.new_text_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ShardResult:
    """What ``run_shard`` did: one SplitResult per output split (``train``, ``val``)."""

    splits: dict[str, SplitResult] = field(default_factory=dict)
    source_documents: int = 0  # rows read from the source by this run
    filtered: int = 0  # rows dropped: null text or shorter than --min-text-length
    seconds: float = 0.0
    interrupted: str | None = None  # "SIGINT"/"SIGTERM" when stopped by a signal
    already_complete: bool = False  # nothing to do: the directories were complete

    @property
    def new_documents(self) -> int:
        return sum(s.new_documents for s in self.splits.values())

    @property
    def complete(self) -> bool:
        return all(s.complete for s in self.splits.values())


class _RateColumn(ProgressColumn):
    """Average documents/s and MB/s since the start of this run."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        docs = task.completed / elapsed
        mb = task.fields.get("text_bytes", 0) / 1e6 / elapsed
        return Text(f"{docs:,.0f} docs/s  {mb:,.1f} MB/s", style="progress.data.speed")


class ShardProgress:
    """Documents written, docs/s and MB/s; a bar when the total (``--take``) is known."""

    def __init__(self, console: Console, total: int | None, label: str) -> None:
        self._console = console
        self._label = label
        self._live = console.is_terminal
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn() if total else TextColumn(""),
            TextColumn("{task.completed:,} docs"),
            TextColumn("{task.fields[shards]} shards"),
            _RateColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not self._live,
        )
        self._task = self._progress.add_task(label, total=total, text_bytes=0, shards=0)
        self._heartbeat = Heartbeat("shard", "documents")  # boot.sh's watchdog: documents are progress
        self._start = time.monotonic()
        self._last_log = self._start

    def __enter__(self) -> "ShardProgress":
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, documents: int, text_bytes: int, shards: int) -> None:
        self._progress.update(self._task, completed=documents, text_bytes=text_bytes, shards=shards)
        self._heartbeat.beat(documents)
        now = time.monotonic()
        if not self._live and now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            elapsed = now - self._start
            self._console.print(
                f"{self._label}: {documents:,} docs, {shards} shards, "
                f"{documents / elapsed:,.0f} docs/s, {text_bytes / 1e6 / elapsed:,.1f} MB/s",
                highlight=False,
            )


def summary_table(result: ShardResult) -> Table:
    """One row per output split: what this run added, the directory's totals, throughput, status."""
    title = "fineweb-sharder"
    if result.interrupted:
        title += f": interrupted by {result.interrupted}, re-run the same command to resume"
    table = Table(title=title, title_justify="left")
    for column in ("split", "added", "docs", "shards", "MB", "s", "docs/s", "MB/s", "status"):
        table.add_column(column, justify="left" if column in ("split", "status") else "right", no_wrap=True)
    for split in result.splits.values():
        status = "done" if split.complete else "partial"
        table.add_row(
            split.split, f"{split.new_documents:,}", f"{split.documents:,}", str(split.shards),
            f"{split.bytes / 1e6:,.1f}", f"{split.seconds:.1f}", f"{split.docs_per_s:,.0f}",
            f"{split.mb_per_s:,.1f}", status,
        )
    notes = [f"{split.split}: {split.directory}" + (" (resumed)" if split.resumed else "")
             for split in result.splits.values()]
    notes.append("MB: on disk; MB/s: text written per second (uncompressed)")
    if result.filtered:
        notes.append(f"{result.filtered:,} documents dropped (empty or shorter than --min-text-length)")
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table
