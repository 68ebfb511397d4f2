"""The sharder as one function: ``run_shard(ShardOptions(...))`` streams a source into text shards.

The loop reads Arrow batches, drops empty/short documents, routes each document to its output
(``split`` mode: by a seeded hash), and hands each output its rows; an output rolls a shard every
``lines_per_shard`` documents and records the stream position in its manifest. Resume starts the
stream at the earliest position among the outputs and skips, per output, the documents it already
holds, so every document lands exactly once even when train and val stopped at different points.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc
from rich.console import Console

from sharder.background import Background
from sharder.errors import ShardError, ShardInterrupted
from sharder.mix import open_recipe_stream
from sharder.options import ShardOptions
from sharder.output import OutputDir
from sharder.report import ShardProgress, ShardResult, SplitResult, summary_table
from sharder.routing import Router
from sharder.sources import Batch, Position, SourceSpec, hf_environment, hub_source, open_stream, resolve_inputs
from sharder.stopsignals import StopSignals

__all__ = ["ShardOptions", "ShardResult", "SplitResult", "run_shard"]


def _kept_rows(batch: Batch, min_length: int) -> np.ndarray:
    """Indices of the new rows that are documents: not null, at least ``min_length`` characters."""
    texts = batch.texts
    if min_length == 0:
        keep = pc.is_valid(texts)
    elif min_length == 1:  # one byte is one character: no UTF-8 decoding needed
        keep = pc.greater(pc.binary_length(texts), 0)
    else:
        keep = pc.greater_equal(pc.utf8_length(texts), min_length)
    mask = keep.fill_null(False).to_numpy(zero_copy_only=False)
    return np.flatnonzero(mask[batch.begin :]) + batch.begin


@dataclass
class _Run:
    """The state of one run_shard call."""

    options: ShardOptions
    outputs: list[OutputDir]
    console: Console
    router: Router | None
    take: int | None
    written: int = 0  # documents in all outputs, before this run included
    result: ShardResult = field(default_factory=ShardResult)
    started: float = field(default_factory=time.monotonic)

    def assign(self, batch: Batch) -> list[tuple[OutputDir, np.ndarray]]:
        """Which rows of ``batch`` each output writes, after routing, resume skips and --take."""
        rows = _kept_rows(batch, self.options.min_text_length)
        self.result.filtered += len(batch) - batch.begin - len(rows)
        if self.router is not None:
            train, val = self.router.split_rows(rows, batch.texts, batch.ids)
            plan = list(zip(self.outputs, (train, val)))
        else:
            plan = [(self.outputs[0], rows)]
        plan = [(out, self._not_yet_in(out, batch, r)) for out, r in plan]
        return plan

    @staticmethod
    def _not_yet_in(out: OutputDir, batch: Batch, rows: np.ndarray) -> np.ndarray:
        """Drop rows an output already holds (it stopped later in the stream than the resume point)."""
        first_new = out.start.documents - batch.start
        return rows if first_new <= 0 else rows[rows >= first_new]

    def cut_at_take(self, plan: list[tuple[OutputDir, np.ndarray]]) -> tuple[list[tuple[OutputDir, np.ndarray]], int | None]:
        """Trim ``plan`` so the run ends exactly at --take documents; returns the last row kept."""
        if self.take is None:
            return plan, None
        room = self.take - self.written
        if sum(len(r) for _, r in plan) < room:
            return plan, None
        last = int(np.sort(np.concatenate([r for _, r in plan]))[room - 1])
        return [(out, r[r <= last]) for out, r in plan], last

    def split_result(self, out: OutputDir) -> SplitResult:
        manifest = out.manifest
        return SplitResult(
            split=out.split,
            directory=out.directory,
            documents=manifest.total_lines if manifest else 0,
            shards=len(manifest.shards) if manifest else 0,
            bytes=manifest.total_bytes if manifest else 0,
            text_bytes=manifest.total_text_bytes if manifest else 0,
            new_documents=out.new_documents,
            new_shards=out.new_shards,
            new_text_bytes=out.new_text_bytes,
            seconds=time.monotonic() - self.started,
            resumed=out.resumed,
            complete=out.complete,
        )

    def finish(self) -> ShardResult:
        self.result.seconds = time.monotonic() - self.started
        self.result.splits = {out.split: self.split_result(out) for out in self.outputs}
        return self.result


def _already_complete(outputs: list[OutputDir], take: int | None, written: int) -> bool:
    if not all(out.complete for out in outputs):
        return False
    return any(out.exhausted for out in outputs) or (take is not None and written >= take)


def run_shard(options: ShardOptions, console: Console | None = None) -> ShardResult:
    """Shard ``options``' source into its output directories; resumable, atomic, exact.

    Raises ShardError on a user error (nothing half-written is left) and ShardInterrupted after a
    SIGINT/SIGTERM (directories consistent; running again resumes).
    """
    console = console or Console(stderr=True)
    cache_dir, token = hf_environment(options.workspace)
    if options.recipe is not None:
        spec = SourceSpec(kind="recipe", dataset=str(options.data), label=f"--data {options.data}")
        source = options.recipe.describe()
    elif options.input is not None:
        spec = resolve_inputs(options.input)
        source = spec.describe()
    else:
        spec = hub_source(options.dataset, options.name, options.source_split, options.source_label)
        source = spec.describe()
    for directory in options.output_dirs().values():
        inside = [f for f in spec.files if f.is_relative_to(directory.resolve())]
        if inside:
            raise ShardError(f"--input {inside[0]}: inside the output directory {directory}; shard it elsewhere")
    background = Background()
    outputs = [
        OutputDir(directory, split, options.mode, source, options.settings(source, split),
                  options.lines_per_shard, options.gzip, options.overwrite, background,
                  labels=options.recipe.labels if options.recipe is not None else None)
        for split, directory in options.output_dirs().items()
    ]
    for out in outputs:
        out.prepare()
    take = options.effective_take
    run = _Run(options, outputs, console, None, take, written=sum(out.documents for out in outputs))
    if _already_complete(outputs, take, run.written):
        console.print(f"already complete: {', '.join(str(o.directory) for o in outputs)} (use --overwrite to redo)")
        run.result.already_complete = True
        return _report(run)
    for out in outputs:
        for note in out.notes:
            console.print(f"{out.directory}: {note}", highlight=False)
    if options.mode == "split":
        run.router = Router(options.val_ratio, options.seed)
    start = min((out.start for out in outputs), key=lambda p: p.documents)
    with StopSignals() as stop:
        try:
            _stream(run, spec, start, stop, cache_dir, token)
        except BaseException as exc:
            background.close()  # shards already complete in the queue are still renamed and recorded
            for out in outputs:
                out.discard()
            if not isinstance(exc, KeyboardInterrupt):  # a second signal: stop now
                raise
            signum = stop.signum or signal.SIGINT
            run.result.interrupted = signal.Signals(signum).name
            raise ShardInterrupted(signum, run.finish()) from None
        finally:
            background.close()
    result = _report(run)
    if stop.signum is not None and not result.complete:
        raise ShardInterrupted(stop.signum, result)
    return result


def _stream(run: _Run, spec: SourceSpec, start: Position, stop: StopSignals, cache_dir: str, token: str | None) -> None:
    """The batch loop, from opening the stream to the final manifests."""
    options, outputs = run.options, run.outputs
    if run.take is not None and run.written >= run.take:  # a crash right after the last shard
        final = max((out.start for out in outputs), key=lambda p: p.documents)
        for out in outputs:
            out.finish(final, exhausted=False, complete=True)
        return
    if options.recipe is not None:
        stream = open_recipe_stream(options.recipe, cache_dir, token)
    else:
        stream = open_stream(spec, options.text_field, options.mode == "split", cache_dir, token)
    label = ", ".join(out.split for out in outputs)
    remaining = run.take - run.written if run.take is not None else None
    final: Position | None = None  # set when --take ends the run inside a batch
    exhausted = False
    with ShardProgress(run.console, remaining, label) as progress:
        for batch in stream.batches(start):
            plan, last = run.cut_at_take(run.assign(batch))
            for out, rows in plan:
                out.write(batch, rows)
                run.written += len(rows)
            run.result.source_documents += len(batch) - batch.begin
            progress.update(
                sum(o.new_documents for o in outputs),
                sum(o.new_text_bytes for o in outputs),
                sum(o.new_shards for o in outputs),
            )
            if last is not None:
                final = batch.position_after(last)
                break
            if stop.signum is not None:
                run.console.print(f"{signal.Signals(stop.signum).name}: closing the current shards", highlight=False)
                run.result.interrupted = signal.Signals(stop.signum).name
                break
        else:
            exhausted = True
    if exhausted and run.written == 0:
        dropped = " (all were empty or shorter than --min-text-length)" if run.result.filtered else ""
        raise ShardError(f"{spec.flag}: no documents in the source{dropped}")
    for out in outputs:
        out.finish(final or stream.position, exhausted=exhausted, complete=final is not None or exhausted)


def _report(run: _Run) -> ShardResult:
    result = run.finish()
    run.console.print(summary_table(result))
    for out in run.outputs:  # a recipe run: what each source gave
        totals = out.manifest.source_totals() if out.manifest else None
        if totals:
            given = ", ".join(f"{name} {docs:,} docs / {size / 1e6:,.1f} MB" for name, (docs, size) in totals.items())
            run.console.print(f"{out.split} sources: {given}", highlight=False)
    return result
