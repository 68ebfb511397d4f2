"""One output directory: the shard being written and the manifest that makes the directory resumable.

Invariants, whatever happens to the process (SIGKILL included):
- a shard is visible under its real name only when whole (written to a ``.tmp-`` name, fsynced,
  renamed by training/atomic.py);
- the manifest is rewritten atomically after each rename and lists exactly the whole shards, with
  the source position just after the last document of the last shard;
- a shard file that exists but is not in the manifest is an orphan of a crash between the rename
  and the manifest update: it is deleted on the next run and written again identically.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import zlib
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sharder.background import Background
from sharder.errors import ShardError
from sharder.manifest import MANIFEST_NAME, Manifest, ManifestError, ShardEntry, load_manifest
from sharder.sources import BATCH_SIZE, START, Batch, Position
from sharder.textshard import encode_lines, rows_by_chunk
from training.atomic import atomic_path, atomic_write_bytes, remove_stale_temporaries

if TYPE_CHECKING:
    import pyarrow as pa

# zlib level 1: ~100 MB/s a core against 30 MB/s at level 6 and 12 MB/s at gzip.open's default 9,
# for ~15% more bytes (measured on the bench corpus): sharding speed is worth more than that disk.
GZIP_LEVEL = 1
# A part of fewer rows than this (in split mode, the few val documents of each batch) is copied
# aside and queued with the next ones: one encode and one write per ~GATHER_ROWS documents instead
# of two thread hand-offs per batch for a handful of rows.
GATHER_ROWS = 64
_SHARD_RE = re.compile(r"^shard_(\d{5,})\.txt(\.gz)?$")
SOURCES_SUFFIX = ".sources"


def shard_name(index: int, gzip: bool) -> str:
    return f"shard_{index:05d}.txt" + (".gz" if gzip else "")


def sources_file(shard: Path) -> Path:
    """A recipe run's side file of a shard: the source index of each line, uint16 little-endian."""
    return shard.with_name(shard.name + SOURCES_SUFFIX)


def shard_files(directory: Path) -> list[Path]:
    """Every file in ``directory`` named like a text shard, listed or not."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SHARD_RE.match(p.name))


def _datasets_version() -> str:
    import datasets

    return datasets.__version__


def copy_rows(texts: "pa.ChunkedArray", rows: np.ndarray) -> "pa.ChunkedArray":
    """A compact copy of sorted ``rows`` of ``texts``, chunk by chunk (Arrow's take on a chunked
    string array would first concatenate every chunk: a copy of the whole batch)."""
    import pyarrow as pa

    return pa.chunked_array([chunk.take(local) for chunk, local in rows_by_chunk(texts.chunks, rows)], texts.type)


def encode_part(texts: "pa.ChunkedArray", rows: np.ndarray | None, gzip: bool) -> tuple[bytes, int]:
    """Rows of a batch (all when None) as shard bytes (a whole gzip member with ``gzip``) and their text size.

    Each call makes an independent gzip member, so parts compress in parallel; a shard is their
    concatenation, which gzip readers (``gzip.open``, ``zcat``) read as one stream. zlib's gzip
    wrapper writes no file name and no mtime, so the same documents always give the same bytes: a
    resumed run's shards are identical to an uninterrupted run's, down to the sha256.
    """
    data = encode_lines(texts, rows)
    return (zlib.compress(data, GZIP_LEVEL, wbits=31) if gzip else data), len(data)


class ShardFile:
    """One shard being written to its temporary name, hashed as the bytes hit the disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self.text_bytes = 0
        self.bytes = 0
        self.sources: dict[str, list[int]] | None = None  # recipe runs, counted as rows are queued
        self.line_sources: list[np.ndarray] = []  # recipe runs: each line's source index, in order
        self._sha = hashlib.sha256()
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(path))
        self._fh = self._stack.enter_context(open(tmp, "wb"))

    def write(self, data: bytes, lines: int, text_bytes: int) -> None:
        self._sha.update(data)
        self._fh.write(data)
        self.bytes += len(data)
        self.lines += lines
        self.text_bytes += text_bytes

    def commit(self) -> ShardEntry:
        """Flush, fsync and rename into place (the sources side file first); returns the manifest entry."""
        if self.line_sources:
            lines = np.concatenate(self.line_sources).astype("<u2")
            atomic_write_bytes(sources_file(self.path), lines.tobytes())
        self._stack.close()
        return ShardEntry(self.path.name, self.lines, self.bytes, self._sha.hexdigest(), self.text_bytes, self.sources)

    def discard(self) -> None:
        """Remove the temporary file; the shard never becomes visible. Harmless after commit."""
        # atomic_path deletes its temporary when its block exits with an exception.
        self._stack.__exit__(_Discarded, _Discarded(), None)


class _Discarded(Exception):
    pass


def _brief(value: Any) -> str:
    """A setting as a refusal message shows it; a source is summarised, not dumped."""
    if not isinstance(value, dict) or "type" not in value:
        return repr(value)
    if value["type"] == "hub":
        return f"{value.get('dataset')} (config {value.get('name')}, split {value.get('split')})"
    files = value.get("files") or [{}]
    size = sum(f.get("bytes", 0) for f in files)
    return f"{len(files)} {value['type']} file(s) of {size:,} bytes from {files[0].get('path')}"


def _resume_record(position: Position, exhausted: bool) -> dict[str, Any]:
    return {
        "documents": position.documents,
        "state": position.state,
        "skip": position.skip,
        "batch_size": BATCH_SIZE,
        "datasets": _datasets_version(),
        "exhausted": exhausted,
    }


class OutputDir:
    """The shards of one split (train or val) in one directory."""

    def __init__(
        self,
        directory: Path,
        split: str,
        mode: str,
        source: dict[str, Any],
        settings: dict[str, Any],
        lines_per_shard: int,
        gzip: bool,
        overwrite: bool,
        background: Background,
        labels: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.split = split
        self.mode = mode
        self.source = source
        self.settings = settings
        self.lines_per_shard = lines_per_shard
        self.gzip = gzip
        self.overwrite = overwrite
        self.labels = labels  # a recipe's source names, indexed by Batch.sources
        self.manifest: Manifest | None = None
        self.notes: list[str] = []
        self.new_documents = 0
        self.new_text_bytes = 0
        self.new_shards = 0
        self.start = START  # where this run picks up, set by prepare()
        self._background = background
        self._shard: ShardFile | None = None
        self._open_lines = 0  # documents queued for the open shard
        self._next_index = 0
        self._unfinished: list[ShardFile] = []  # created, not yet renamed into place
        self._gathered: list["pa.ChunkedArray"] = []  # small parts of the open shard, not yet queued
        self._gathered_rows = 0
        self._started = False

    # -- before anything is written -------------------------------------------------------------

    def prepare(self) -> None:
        """Read and check an existing manifest; change nothing on disk."""
        if self.overwrite:
            return
        path = self.directory / MANIFEST_NAME
        if not path.exists():
            if shard_files(self.directory):
                raise ShardError(
                    f"{self.directory}: holds shard files but no {MANIFEST_NAME}; "
                    "use --overwrite to start over or choose another --output-dir"
                )
            return
        try:
            manifest = load_manifest(self.directory)
        except ManifestError as exc:
            raise ShardError(f"{exc}; use --overwrite to start over") from None
        differences = [
            f"{key}: {_brief(manifest.settings.get(key))} there, {_brief(value)} now"
            for key, value in self.settings.items()
            if manifest.settings.get(key) != value
        ]
        if differences:
            raise ShardError(
                f"{self.directory}: holds shards from a different source or settings ({'; '.join(differences)}); "
                "use --overwrite to start over or choose another --output-dir"
            )
        for entry in manifest.shards:
            shard = self.directory / entry.name
            if not shard.is_file() or shard.stat().st_size != entry.bytes:
                raise ShardError(
                    f"{shard}: listed in {MANIFEST_NAME} but missing or changed; use --overwrite to start over"
                )
        self.manifest = manifest
        self.start = self._start_position()

    def _recorded(self) -> Position:
        resume = self.manifest.resume if self.manifest else {}
        if not resume:
            return START
        return Position(int(resume.get("documents", 0)), resume.get("state"), int(resume.get("skip", 0)))

    def _start_position(self) -> Position:
        """Where this directory's documents stop in the source: the stream state when it is usable.

        A state is only valid for the batch size and `datasets` release that produced it; otherwise
        fall back to re-reading the stream from the start and skipping the recorded count.
        """
        recorded = self._recorded()
        resume = self.manifest.resume if self.manifest else {}
        if recorded.documents == 0 or (
            resume.get("batch_size") == BATCH_SIZE and resume.get("datasets") == _datasets_version()
        ):
            return recorded
        self.notes.append(
            f"stream state saved by datasets {resume.get('datasets')} (batch size {resume.get('batch_size')}) "
            f"is not reused: skipping {recorded.documents:,} documents instead"
        )
        return Position(recorded.documents, None, recorded.documents)

    @property
    def resumed(self) -> bool:
        return self.start.documents > 0

    @property
    def exhausted(self) -> bool:
        return self.manifest is not None and bool(self.manifest.resume.get("exhausted"))

    @property
    def complete(self) -> bool:
        return self.manifest is not None and self.manifest.complete

    @property
    def documents(self) -> int:
        return self.manifest.total_lines if self.manifest else 0

    # -- writing ---------------------------------------------------------------------------------

    def _begin(self) -> None:
        """First write of this run: clean the directory and make sure a manifest exists."""
        if self._started:
            return
        self._started = True
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory)
        if self.overwrite:
            (self.directory / MANIFEST_NAME).unlink(missing_ok=True)
        listed = {entry.name for entry in self.manifest.shards} if self.manifest else set()
        for path in shard_files(self.directory):
            if path.name not in listed:
                path.unlink()
        for path in self.directory.glob(f"shard_*{SOURCES_SUFFIX}"):
            if path.name[: -len(SOURCES_SUFFIX)] not in listed:
                path.unlink()
        self._next_index = len(self.manifest.shards) if self.manifest else 0
        if self.manifest is None:
            self.manifest = Manifest(
                source=self.source, mode=self.mode, split=self.split, settings=self.settings,
                resume=_resume_record(START, exhausted=False),
            )
            self.manifest.save(self.directory)

    def write(self, batch: Batch, rows: np.ndarray) -> None:
        """Append rows of ``batch`` (indices, in order), rolling to a new shard every lines_per_shard.

        Encoding and disk work run on the Background threads; the manifest is only ever touched by
        the commit thread, after the shard it records has been renamed.
        """
        if not len(rows):
            return
        self._guard(self._begin)
        done = 0
        while done < len(rows):
            if self._shard is None:
                path = self.directory / shard_name(self._next_index, self.gzip)
                self._shard = self._guard(lambda: ShardFile(path))
                self._unfinished.append(self._shard)
                self._next_index += 1
            part = rows[done : done + self.lines_per_shard - self._open_lines]
            if self.labels is not None and batch.sources is not None:
                self._count_sources(self._shard, batch, part)
            if len(part) < GATHER_ROWS:  # a few rows (val in split mode): copied aside, written together
                self._gathered.append(copy_rows(batch.texts, part))  # not a view: the batch can go
                self._gathered_rows += len(part)
                if self._gathered_rows >= GATHER_ROWS:
                    self._flush_gathered()
            else:
                self._flush_gathered()
                self._queue_part(batch.texts, part)
            self._open_lines += len(part)
            self.new_documents += len(part)
            done += len(part)
            if self._open_lines >= self.lines_per_shard:
                self._close_shard(batch.position_after(int(part[-1])))

    def _count_sources(self, shard: ShardFile, batch: Batch, rows: np.ndarray) -> None:
        """Add each source's documents and bytes among ``rows`` to ``shard`` (on the reader thread,
        before the shard's commit is queued, so the commit thread sees the final counts)."""
        import pyarrow.compute as pc

        sizes = np.concatenate([
            pc.binary_length(chunk).to_numpy(zero_copy_only=False)[local]
            for chunk, local in rows_by_chunk(batch.texts.chunks, rows)
        ]) if len(rows) else np.zeros(0, dtype=np.int64)
        which = batch.sources[rows]
        shard.line_sources.append(which)
        counts = shard.sources if shard.sources is not None else {}
        for index in np.unique(which):
            entry = counts.setdefault(self.labels[int(index)], [0, 0])
            entry[0] += int(np.count_nonzero(which == index))
            entry[1] += int(sizes[which == index].sum())
        shard.sources = counts

    def _queue_part(self, texts: "pa.ChunkedArray", rows: np.ndarray | None) -> None:
        """Encode ``rows`` of ``texts`` (all when None) on an encoder thread, then append them to
        the open shard, in order."""
        encoded = self._background.encode(encode_part, texts, rows, self.gzip)
        lines = len(texts) if rows is None else len(rows)
        self._guard(lambda: self._background.submit(self._append, self._shard, encoded, lines))

    def _flush_gathered(self) -> None:
        """Queue the gathered rows as one part (before anything queued after them)."""
        if not self._gathered:
            return
        import pyarrow as pa

        gathered = self._gathered
        self._gathered, self._gathered_rows = [], 0
        kind = gathered[0].type
        texts = pa.chunked_array([chunk for piece in gathered for chunk in piece.cast(kind).chunks], kind)
        self._queue_part(texts, None)

    def _append(self, shard: ShardFile, encoded: Future, lines: int) -> None:  # on the disk thread
        data, text_bytes = encoded.result()
        shard.write(data, lines, text_bytes)
        self.new_text_bytes += text_bytes

    def _close_shard(self, position: Position, exhausted: bool = False, complete: bool = False) -> None:
        """Queue: make the open shard (if any) visible, then record it and ``position`` in the manifest."""
        self._flush_gathered()
        shard, self._shard, self._open_lines = self._shard, None, 0
        self._guard(lambda: self._background.commit(self._record, shard, position, exhausted, complete))

    def _record(self, shard: ShardFile | None, position: Position, exhausted: bool, complete: bool) -> None:
        """On the commit thread, after the shard's writes: rename it, then rewrite the manifest."""
        assert self.manifest is not None
        if shard is not None:
            self.manifest.shards.append(shard.commit())
            self._unfinished.remove(shard)
            self.new_shards += 1
        self.manifest.resume = _resume_record(position, exhausted)
        self.manifest.complete = complete
        self.manifest.save(self.directory)

    def _guard(self, action: Any) -> Any:
        """Run a disk operation; a failure (full disk, permissions) becomes one line naming the directory."""
        try:
            return action()
        except OSError as exc:
            raise ShardError(f"{self.directory}: cannot write: {exc.strerror or exc}") from None

    def finish(self, position: Position, exhausted: bool, complete: bool) -> None:
        """End of this run (source exhausted, --take reached or a stop signal): close the partial shard.

        ``position`` is the run's; a directory that already holds documents beyond it (split mode,
        resumed from the other directory's earlier position) keeps its own.
        """
        self._guard(self._begin)
        self._guard(self._background.wait)
        if self._shard is None and self._recorded().documents > position.documents:
            position = self._recorded()
        self._close_shard(position, exhausted=exhausted, complete=complete)
        self._guard(self._background.wait)

    def discard(self) -> None:
        """Abandon unfinished shards after an error or a second signal, once the Background is
        closed; the manifest stays as it was after the last whole shard."""
        for shard in self._unfinished:
            shard.discard()
        self._unfinished.clear()
        self._gathered, self._gathered_rows = [], 0
        self._shard = None
