"""Text straight into the trainer: parquet, jsonl or txt files, tokenized on the fly and packed.

Seed 003's loader. ``train_data`` names text files, folders or globs (a list pools them). Each
epoch visits the files in an order permuted from (seed, epoch); inside a file the rows are read
linearly, in the order they were written. Every row's ids, followed by the end-of-text id, are laid
end to end and cut into windows of ``seq_len + 1`` tokens that overlap by one (a window's last
target is the next window's first input), as the token-shard loader does: no padding, no token
dropped, a window may span documents.

Rows: a parquet or jsonl row gives its ``text`` column; a row that carries token ids instead
(``input_ids``, ``tokens`` or ``ids``: seed 004's processed JSONL shards) is used as it is, without
the tokenizer and without an added separator (its producer already packed it). A .txt line is one
document, the rule of the `datasets` text builder that the sharder follows too. An empty row
contributes nothing, not even a separator.

Position and exact resume: the state is where the next window starts, as (epoch, index in the
epoch's file order, row of that file, token of that row). A resume tokenizes that one row again and
skips to the token, and skips whole parquet row groups before it unread: nothing of the data is
stored in the checkpoint, and the stream after a resume is token for token the stream of an
uninterrupted run.

Throughput: a background thread reads rows in chunks and tokenizes each with
``Tokenizer.encode_batch``, which runs in Rust on every core with the GIL released, up to
``PREFETCH_CHUNKS`` chunks ahead of the windows being cut, so the training step never waits on the
tokenizer while it keeps up (bench/text_loader.py measures it against the trainer's demand).

Data parallelism: every micro-step takes one global block of ``world * B`` windows and rank ``r``
keeps rows ``[r*B, (r+1)*B)``, as with token shards, so a checkpoint resumes on any world size. The
cost is that each rank tokenizes the whole stream (a window's boundaries depend on every token
before it): for many GPUs per node, tokenize once ahead of time (``orchestrate``'s encode stage).
"""

from __future__ import annotations

import gzip
import itertools
import json
import queue
import threading
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from training.data import DataError, text_kind
from training.text_tokenizer import TextTokenizer

TEXT_COLUMN = "text"
ID_COLUMNS = ("input_ids", "tokens", "ids")
CHUNK_ROWS = 256  # rows per encode_batch call: enough to keep the Rust threads busy, little to hold
PREFETCH_CHUNKS = 16  # chunks tokenized ahead of the reader
_POLL_S = 0.1


@dataclass(frozen=True)
class TextFile:
    """One input file and the column read from it."""

    path: Path
    kind: str  # parquet | json | text
    column: str
    ids: bool  # the column holds token ids, not text


def inspect_file(path: Path, key: str) -> TextFile:
    """Which column of ``path`` to read: ``text``, else a token-id column; neither is a DataError naming the file."""
    kind = text_kind(path)
    if kind == "text":
        return TextFile(path, kind, TEXT_COLUMN, False)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            columns = list(pq.read_schema(path).names)
        else:
            columns = list(_first_record(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{key}: {path}: cannot read ({' '.join(str(exc).split())[:160]})") from None
    if TEXT_COLUMN in columns:
        return TextFile(path, kind, TEXT_COLUMN, False)
    ids = next((c for c in ID_COLUMNS if c in columns), None)
    if ids is None:
        raise DataError(f"{key}: {path}: no '{TEXT_COLUMN}' column and no token ids ({', '.join(ID_COLUMNS)}); "
                        f"columns: {', '.join(columns) or 'none'}")
    return TextFile(path, kind, ids, True)


def _first_record(path: Path) -> dict[str, Any]:
    with _open_text(path) as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("each line must be a JSON object")
                return record
    return {}


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def read_rows(f: TextFile, start: int) -> Iterator[list[Any]]:
    """The values of ``f``'s column from row ``start`` on, in lists of at most CHUNK_ROWS rows."""
    if f.kind == "text":
        with _open_text(f.path) as fh:
            lines = (line.rstrip("\n") for line in itertools.islice(fh, start, None))
            while chunk := list(itertools.islice(lines, CHUNK_ROWS)):
                yield chunk
        return
    first, batches = _arrow_batches(f, start)
    skip = start - first
    for batch in batches:
        values = batch.column(0).to_pylist()
        if skip >= len(values):
            skip -= len(values)
            continue
        values, skip = values[skip:], 0
        for i in range(0, len(values), CHUNK_ROWS):
            yield values[i : i + CHUNK_ROWS]


def _arrow_batches(f: TextFile, start: int) -> tuple[int, Iterator[Any]]:
    """(the row the batches begin at, Arrow record batches of the one column). Parquet begins at the
    row group holding row ``start``, the groups before it unread; jsonl at its first row."""
    import pyarrow as pa

    if f.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f.path)
        groups, group, before = pf.metadata.num_row_groups, 0, 0
        while group < groups and before + pf.metadata.row_group(group).num_rows <= start:
            before += pf.metadata.row_group(group).num_rows
            group += 1
        return before, pf.iter_batches(batch_size=CHUNK_ROWS, row_groups=list(range(group, groups)), columns=[f.column])
    import pyarrow.json as pj

    kind = pa.list_(pa.int64()) if f.ids else pa.string()
    parse = pj.ParseOptions(explicit_schema=pa.schema([(f.column, kind)]), unexpected_field_behavior="ignore")
    return 0, _json_batches(f.path, parse)


def _json_batches(path: Path, parse: Any) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.json as pj

    with pa.input_stream(str(path), compression="detect") as stream:
        yield from pj.open_json(stream, parse_options=parse)


@dataclass
class TextPosition:
    """Where the next window starts."""

    epoch: int = 0
    index: int = 0  # in the epoch's file order
    row: int = 0
    token: int = 0  # in that row's ids (its end-of-text id included)


@dataclass
class _Chunk:
    """Consecutive rows of one file, tokenized: ``tokens`` flat, ``ends[i]`` the end of row ``row + i``."""

    epoch: int
    index: int
    row: int
    skip: int  # tokens of the first row left out (a resume inside that row)
    tokens: np.ndarray
    ends: np.ndarray

    def position(self, offset: int) -> TextPosition:
        """The position of ``tokens[offset]`` (``offset == len(tokens)``: the row after the chunk)."""
        i = int(np.searchsorted(self.ends, offset, side="right"))
        if i == len(self.ends):
            return TextPosition(self.epoch, self.index, self.row + i, 0)
        start = int(self.ends[i - 1]) if i else 0
        return TextPosition(self.epoch, self.index, self.row + i, offset - start + (self.skip if i == 0 else 0))


class TextStream:
    """An endless, deterministic, resumable stream of windows over text files (the TokenStream interface)."""

    def __init__(self, files: list[TextFile], tokenizer: TextTokenizer | None, seed: int, vocab_size: int,
                 shuffle: bool = True, key: str = "train_data") -> None:
        needs = [f.path for f in files if not f.ids]
        if needs and tokenizer is None:
            raise DataError(f"{key}: {needs[0]} holds text: set tokenizer_path (a tokenizer.json, its folder, or a hub id such as gpt2)")
        if tokenizer is not None and tokenizer.vocab_size > vocab_size:
            raise DataError(f"tokenizer_path {tokenizer.source}: {tokenizer.vocab_size} ids, more than model.vocab_size={vocab_size} "
                            f"(set model.vocab_size to at least {tokenizer.vocab_size})")
        self.files, self.tokenizer, self.seed, self.vocab_size = files, tokenizer, seed, vocab_size
        self.shuffle, self.key = shuffle, key
        self._chunks: deque[_Chunk] = deque()
        self._offset = 0  # into the front chunk
        self._after = TextPosition()  # the position when no chunk is held
        self._worker: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH_CHUNKS)
        self._stop = threading.Event()
        self._closed = False

    # -- order and tokens --------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        """The order in which ``epoch`` visits the files (seed 003: a new permutation each epoch)."""
        idx = np.arange(len(self.files))
        return np.random.default_rng([self.seed, epoch]).permutation(idx) if self.shuffle else idx

    def _encode(self, values: list[Any], f: TextFile, row: int) -> tuple[np.ndarray, np.ndarray]:
        if f.ids:
            rows = [list(v) if v else [] for v in values]
        else:
            assert self.tokenizer is not None
            texts = [v for v in values if v]
            encoded = iter(self.tokenizer.encode_batch(texts))
            eot = [self.tokenizer.eot_id]
            rows = [next(encoded) + eot if v else [] for v in values]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        tokens = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        if f.ids and len(tokens) and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            bad = int(np.argmax((tokens >= self.vocab_size) | (tokens < 0)))
            at = row + int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
            raise DataError(f"{self.key}: {f.path}: row {at}: token id {int(tokens[bad])} outside model.vocab_size {self.vocab_size}")
        return tokens.astype(np.int32), np.cumsum(lengths)

    def _produce(self, start: TextPosition) -> Iterator[_Chunk]:
        epoch, index, row, skip = start.epoch, start.index, start.row, start.token
        while True:
            whole_epoch, found = index == 0 and row == 0, 0
            order = self.order(epoch)
            for i in range(index, len(self.files)):
                f = self.files[int(order[i])]
                try:
                    for values in read_rows(f, row):
                        tokens, ends = self._encode(values, f, row)
                        if skip:
                            if skip >= ends[0]:
                                raise DataError(f"{self.key}: {f.path}: row {row} has {int(ends[0])} tokens, the saved position is "
                                                f"token {skip}: the file changed since the checkpoint")
                            tokens, ends = tokens[skip:], ends - skip
                        yield _Chunk(epoch, i, row, skip, tokens, ends)
                        found += len(tokens)
                        row, skip = row + len(values), 0
                except (OSError, ValueError) as exc:
                    if isinstance(exc, DataError):
                        raise
                    raise DataError(f"{self.key}: {f.path}: cannot read ({' '.join(str(exc).split())[:160]})") from None
                if skip:
                    raise DataError(f"{self.key}: {f.path}: the saved position (row {row}) is past its end: the file changed")
                row = 0
            if whole_epoch and not found:
                raise DataError(f"{self.key}: no tokens in {len(self.files)} file(s) ({self.files[0].path}, ...): every row is empty")
            epoch, index = epoch + 1, 0

    def _run(self, start: TextPosition) -> None:
        try:
            for chunk in self._produce(start):
                if not self._put(chunk):
                    return
        except BaseException as exc:  # surfaced in the reading thread
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _next_chunk(self) -> _Chunk:
        if self._worker is None:  # (re)start just after the chunks already held
            start = self._chunks[-1].position(len(self._chunks[-1].tokens)) if self._chunks else self._after
            self._stop.clear()
            self._worker = threading.Thread(target=self._run, args=(start,), name=f"tokenize-{self.key}", daemon=True)
            self._worker.start()
        while True:
            if self._closed:
                raise DataError(f"{self.key}: the text reader was closed")
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                continue
        if isinstance(item, BaseException):
            self._halt()
            raise item
        return item

    # -- windows ----------------------------------------------------------------------------
    def read_rows(self, n: int, seq_len: int) -> np.ndarray:
        """The next ``n`` windows as an ``(n, seq_len + 1)`` array; the position moves past them."""
        out = np.empty((n, seq_len + 1), dtype=np.int64)
        for row in out:
            self._fill(row)
            self._advance(seq_len)
        return out

    def _fill(self, row: np.ndarray) -> None:
        """Copy the next ``len(row)`` tokens into ``row`` without moving the position."""
        filled, held, offset = 0, 0, self._offset
        while filled < len(row):
            if held == len(self._chunks):
                self._chunks.append(self._next_chunk())
            piece = self._chunks[held].tokens[offset : offset + len(row) - filled]
            row[filled : filled + len(piece)] = piece
            filled, held, offset = filled + len(piece), held + 1, 0

    def _advance(self, n: int) -> None:
        while n:
            front = self._chunks[0]
            left = len(front.tokens) - self._offset
            if n < left:
                self._offset += n
                return
            n -= left
            self._after = front.position(len(front.tokens))
            self._chunks.popleft()
            self._offset = 0
            if n and not self._chunks:
                self._chunks.append(self._next_chunk())

    # -- state ------------------------------------------------------------------------------
    def position(self) -> TextPosition:
        return self._chunks[0].position(self._offset) if self._chunks else self._after

    def state_dict(self) -> dict[str, int]:
        return {**asdict(self.position()), "files": len(self.files)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "row" not in state:
            raise DataError(f"{self.key}: the checkpoint's reader position is for token shards, not text files")
        if int(state.get("files", len(self.files))) != len(self.files):
            raise DataError(f"{self.key}: the checkpoint's position is in {state['files']} files, {self.key} now has "
                            f"{len(self.files)}: resuming would not continue the same stream")
        self._halt()
        self._chunks.clear()
        self._offset = 0
        self._after = TextPosition(*(int(state[k]) for k in ("epoch", "index", "row", "token")))

    def rewind(self) -> None:
        """Back to the start of epoch 0 (validation reads the same windows every time)."""
        self.load_state_dict({**asdict(TextPosition()), "files": len(self.files)})

    def _halt(self) -> None:
        """Stop the tokenizing thread; the next read restarts it from the position."""
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None
            self._queue = queue.Queue(maxsize=PREFETCH_CHUNKS)

    def close(self) -> None:
        """Stop for good: the thread ends, a read still waiting (the prefetcher's) fails instead of hanging."""
        self._closed = True
        self._halt()
