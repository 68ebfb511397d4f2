"""Where documents come from: a Hugging Face dataset or local files, always as a `datasets` stream.

Every source, the hub included, goes through ``datasets.load_dataset(..., streaming=True)`` so the
code path the tests run on local parquet/json/txt files is the one a pod runs on FineWeb. The
stream is read in Arrow batches (no per-row Python dicts) and its position is the
``IterableDataset.state_dict()`` taken *before* each batch plus an offset into the batch: a shard
can end in the middle of a batch, and resuming loads that state and skips the offset. The state is
taken on the raw stream (only ``select_columns`` on top, which passes the state through), never
after a ``.map()`` (see DESIGN.md, data facts).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from sharder.errors import ShardError
from training.hub import unreachable_reason
from training.jsonl import describe_bad_line

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import IterableDataset

# Rows per Arrow batch: large enough that per-batch Python work is noise (~3 MB of FineWeb text),
# small enough that a stop request is honoured within milliseconds. A saved stream state is only
# valid with the batch size it was taken with, so the manifest records it.
BATCH_SIZE = 1000
DEFAULT_DATASET = "HuggingFaceFW/fineweb"
ROUTE_KEY = "id"

# Longest suffix first, so ``a.jsonl.gz`` is json and not an unknown ``.gz``.
_SUFFIX_KINDS = (
    (".jsonl.gz", "json"),
    (".json.gz", "json"),
    (".txt.gz", "text"),
    (".parquet", "parquet"),
    (".jsonl", "json"),
    (".json", "json"),
    (".txt", "text"),
)
SUPPORTED_SUFFIXES = ", ".join(suffix for suffix, _ in reversed(_SUFFIX_KINDS))


@dataclass(frozen=True)
class Position:
    """A point in the source stream: ``documents`` rows consumed since its start.

    ``state`` is the stream's state_dict at some earlier batch boundary (None: the very start) and
    ``skip`` how many rows after that state are already consumed.
    """

    documents: int = 0
    state: dict[str, Any] | None = None
    skip: int = 0


START = Position()


@dataclass(frozen=True)
class SourceSpec:
    """A resolved source: the hub (``dataset``/``name``/``split``) or a list of local files of one kind."""

    kind: str  # "hub", "parquet", "json" or "text"
    dataset: str | None = None
    name: str | None = None
    split: str = "train"
    revision: str | None = None  # hub: a branch or ref (refs/convert/parquet: the Hub's parquet conversion)
    data_dir: str | None = None  # hub: the repository folder to read
    files: tuple[Path, ...] = ()
    columns: tuple[str, ...] | None = None  # known before streaming (parquet footers), else None
    label: str | None = None  # how the user typed it when not as --dataset (orchestrate's --input hf:..., a recipe's "--data r.yaml: source wiki")

    @property
    def flag(self) -> str:
        """How error messages name this source: the flag the user typed."""
        if self.label:
            return self.label
        return f"--dataset {self.dataset}" if self.kind == "hub" else "--input"

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source``: enough to refuse resuming from something else."""
        if self.kind == "hub":
            where = {k: v for k, v in (("revision", self.revision), ("data_dir", self.data_dir)) if v}  # set only: older manifests still match
            return {"type": "hub", "dataset": self.dataset, "name": self.name, "split": self.split, **where}
        return {
            "type": self.kind,
            "split": self.split,
            "files": [{"path": str(f), "bytes": f.stat().st_size} for f in self.files],
        }


def input_kind(path: Path) -> str | None:
    """The `datasets` builder for a local file, from its name; None when unsupported."""
    name = path.name.lower()
    for suffix, kind in _SUFFIX_KINDS:
        if name.endswith(suffix):
            return kind
    return None


def _naming(where: str | None, item: str | Path) -> str:
    """How an error names a local input: ``--input PATH``, or a recipe's source and its path."""
    return f"{where}: path {item}" if where else f"--input {item}"


def _expand(pattern: str, where: str | None = None) -> list[Path]:
    path = Path(pattern).expanduser()
    if glob.has_magic(pattern):
        matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        if not matches:
            raise ShardError(f"{_naming(where, pattern)}: matches no file")
        return matches
    if path.is_dir():
        matches = sorted(p for p in path.rglob("*") if p.is_file() and input_kind(p))
        if not matches:
            raise ShardError(f"{_naming(where, pattern)}: directory holds no {SUPPORTED_SUFFIXES} file")
        return matches
    if not path.exists():
        raise ShardError(f"{_naming(where, pattern)}: no such file")
    return [path]


def _check_readable(path: Path, kind: str, where: str | None = None) -> tuple[tuple[str, ...] | None, int | None]:
    """Fail now, before anything is written, on a file `datasets` would choke on mid-run.

    Returns (column names, row count) where the file format states them (parquet), else Nones.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ShardError(f"{_naming(where, path)}: cannot read: {exc.strerror or exc}") from None
    if path.name.lower().endswith(".gz") and head and head[:2] != b"\x1f\x8b":
        raise ShardError(f"{_naming(where, path)}: not a gzip file")
    if kind != "parquet":
        return None, None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
        return tuple(metadata.schema.to_arrow_schema().names), metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{_naming(where, path)}: not a readable parquet file ({_first_line(exc)})") from None


def resolve_inputs(patterns: list[str], where: str | None = None) -> SourceSpec:
    """Expand paths, globs and directories into one kind of file; check each can be read.

    Parquet files with no rows are left out (`datasets` cannot stream them).
    """
    files: list[Path] = []
    for pattern in patterns:
        for path in _expand(pattern, where):
            resolved = path.resolve()
            if resolved not in files:
                files.append(resolved)
    kinds: dict[str, Path] = {}
    for path in files:
        kind = input_kind(path)
        if kind is None:
            raise ShardError(f"{_naming(where, path)}: unsupported file type (expected {SUPPORTED_SUFFIXES})")
        kinds.setdefault(kind, path)
    if len(kinds) > 1:
        listed = ", ".join(f"{kind} ({path.name})" for kind, path in kinds.items())
        raise ShardError(f"{where or '--input'} mixes file types: {listed}; shard each type separately")
    (kind,) = kinds
    columns: tuple[str, ...] | None = ("text",) if kind == "text" else None
    readable: list[Path] = []
    for path in files:
        file_columns, rows = _check_readable(path, kind, where)
        if rows == 0:
            continue
        columns = columns or file_columns
        readable.append(path)
    if not readable:
        raise ShardError(f"{where or '--input'}: no documents in the source (every file is empty)")
    return SourceSpec(kind=kind, files=tuple(readable), columns=columns, label=where)


def hub_source(dataset: str, name: str | None, split: str, label: str | None = None) -> SourceSpec:
    return SourceSpec(kind="hub", dataset=dataset, name=name, split=split, label=label)


def hf_environment(workspace: Path) -> tuple[str, str | None]:
    """Point Hugging Face caches into the workspace (unless HF_HOME is set); return (cache_dir, token).

    The environment is set before `datasets` is first imported (it reads it at import time); the
    cache directory is also returned so it can be passed explicitly when `datasets` was imported
    earlier in the process. The token is handed to `datasets` and never printed.
    """
    home = os.environ.get("HF_HOME")
    if not home:
        home = str((workspace / "hf_cache").resolve())
        os.environ["HF_HOME"] = home
    cache_dir = os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets")
    os.environ.setdefault("HF_DATASETS_CACHE", cache_dir)
    token = os.environ.get("HUGGINGFACEHUB_API_TOKEN") or os.environ.get("HF_TOKEN") or None
    return cache_dir, token


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:297] + "..."


def _find_shard_index(state: Any) -> int | None:
    """The innermost ``shard_idx`` of a datasets state_dict: which file was being read."""
    if isinstance(state, dict):
        for key, value in state.items():
            found = _find_shard_index(value) if isinstance(value, dict) else None
            if found is not None:
                return found
        if isinstance(state.get("shard_idx"), int):
            return state["shard_idx"]
    return None


def source_error(
    spec: SourceSpec, what: str, exc: BaseException, token: str | None, state: Any = None
) -> ShardError:
    """One line naming the flag, or the file being read when the stream state tells which."""
    message = _first_line(exc)
    if token:
        message = message.replace(token, "***")
    where = spec.flag
    index = _find_shard_index(state) if spec.kind != "hub" else None
    known = index is not None and index < len(spec.files)
    if spec.kind == "json" and "JSON parse error" in message:  # pyarrow counts rows of its block: find the line
        located = describe_bad_line([spec.files[index]] if known else list(spec.files))
        if located is not None:
            return ShardError(f"{spec.label}: {located}" if spec.label else f"--input {located}")
    if known:
        where = _naming(spec.label, spec.files[index])
    return ShardError(f"{where}: {what}: {message}")


@dataclass
class Batch:
    """Rows ``begin:`` of one Arrow batch are new; row ``i`` is document ``start + i`` of the source."""

    state: dict[str, Any] | None  # stream state before this batch
    start: int
    begin: int
    texts: "pa.ChunkedArray"  # string or large_string; nulls where a row has no text
    ids: "pa.Array | None"  # the routing key column as strings (split mode, when the source has ids)
    sources: np.ndarray | None = None  # a mixed stream's source index of each row (recipes)

    def __len__(self) -> int:
        return len(self.texts)

    def position_after(self, row: int) -> Position:
        """The position just after row ``row`` of this batch."""
        return Position(self.start + row + 1, self.state, row + 1)


@dataclass
class Stream:
    """A `datasets` stream of one text column (and the routing key), read in Arrow batches."""

    spec: SourceSpec
    text_field: str
    key_field: str | None  # the id column, read only in split mode
    dataset: "IterableDataset"
    token: str | None = None
    source_field: str | None = None  # a mixed stream's source index column
    _position: Position = field(default=START, init=False)

    def _texts(self, table: "pa.Table") -> "pa.ChunkedArray":
        import pyarrow as pa

        if self.text_field not in table.column_names:
            raise ShardError(
                f"--text-field {self.text_field!r}: no such column in {self._where()} "
                f"(columns: {', '.join(table.column_names)})"
            )
        column = table.column(self.text_field)
        kind = column.type
        if pa.types.is_null(kind):  # every row null in this batch (json)
            column = column.cast(pa.string())
        elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ShardError(f"--text-field {self.text_field!r}: column holds {kind}, not text, in {self._where()}")
        return column  # kept in its chunks: combining would copy the batch's text on the reader thread

    def _ids(self, table: "pa.Table") -> "pa.Array | None":
        """The id column as strings, or None (no id column, or ids that are not strings or numbers)."""
        import pyarrow as pa

        if self.key_field is None or self.key_field not in table.column_names:
            return None
        column = table.column(self.key_field)
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            return column
        try:
            return column.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None

    def _where(self) -> str:
        return self.spec.dataset if self.spec.kind == "hub" else ", ".join(f.name for f in self.spec.files[:3])

    def batches(self, start: Position = START) -> Iterator[Batch]:
        """Yield batches from ``start`` on; ``position`` afterwards says how far the stream got."""
        if start.state is not None:
            self.dataset.load_state_dict(start.state)
        self._position = Position(start.documents - start.skip, start.state, 0)
        skip = start.skip
        iterator = iter(self.dataset.iter(batch_size=BATCH_SIZE))
        while True:
            try:
                table = next(iterator)
            except StopIteration:
                return
            except Exception as exc:  # anything `datasets`/pyarrow raise while reading is about the input
                what = f"reading failed after document {self._position.documents}"
                raise source_error(self.spec, what, exc, self.token, self.dataset.state_dict()) from None
            rows = table.num_rows
            before = self._position
            self._position = Position(before.documents + rows, self.dataset.state_dict(), 0)
            if skip >= rows:
                skip -= rows
                continue
            sources = None
            if self.source_field is not None:
                sources = table.column(self.source_field).to_numpy()
            yield Batch(before.state, before.documents, skip, self._texts(table), self._ids(table), sources)
            skip = 0

    @property
    def position(self) -> Position:
        """Just after the last batch read."""
        return self._position


def load_source(spec: SourceSpec, cache_dir: str, token: str | None) -> "IterableDataset":
    """``spec`` as a raw streaming `datasets` IterableDataset; failures are one-line ShardErrors."""
    from datasets import load_dataset

    if spec.kind == "hub" and (reason := unreachable_reason()) is not None:
        raise ShardError(f"{spec.flag}: cannot reach the Hugging Face Hub: {reason}")
    try:
        if spec.kind == "hub":
            dataset = load_dataset(
                spec.dataset, name=spec.name, split=spec.split, revision=spec.revision, data_dir=spec.data_dir,
                streaming=True, token=token, cache_dir=cache_dir
            )
        else:
            dataset = load_dataset(
                spec.kind, data_files=[str(f) for f in spec.files], split="train", streaming=True, cache_dir=cache_dir
            )
    except ShardError:
        raise
    except ConnectionError as exc:
        offline = "offline" in str(exc).lower()
        reason = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "is the network up?"
        raise ShardError(f"{spec.flag}: cannot reach the Hugging Face Hub: {reason}") from None
    except StopIteration:  # the json builder, on files with no row to infer columns from
        raise ShardError(f"{spec.flag}: no documents in the source") from None
    except Exception as exc:  # `datasets` raises many types for a bad name, config, split or file
        message = str(exc)
        if spec.kind == "hub" and message.startswith("BuilderConfig"):
            if spec.label and not spec.label.startswith("--data"):  # orchestrate's --input hf:OWNER/DATASET/CONFIG
                raise ShardError(f"{spec.label}: {_first_line(exc)}") from None
            flag = f"{spec.label}: config" if spec.label else "--name"
            raise ShardError(f"{flag} {spec.name}: {_first_line(exc)}") from None
        if message.startswith("Bad split"):
            flag = f"{spec.label}: split" if spec.label else "--source-split"
            raise ShardError(f"{flag} {spec.split}: {_first_line(exc)}") from None
        missing = type(exc).__name__ in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError")
        what = "no such dataset (or it is gated: set HF_TOKEN)" if missing else "cannot open"
        raise source_error(spec, what, exc, token) from None
    return dataset


def open_stream(spec: SourceSpec, text_field: str, need_key: bool, cache_dir: str, token: str | None) -> Stream:
    """Open ``spec`` as a streaming `datasets` IterableDataset restricted to the columns we use."""
    if spec.kind == "text" and text_field != "text":
        raise ShardError(f"--text-field {text_field!r}: .txt inputs have a single column, 'text'")
    if spec.columns is not None and text_field not in spec.columns:
        raise ShardError(
            f"--text-field {text_field!r}: no such column in {spec.files[0]} (columns: {', '.join(spec.columns)})"
        )
    dataset = load_source(spec, cache_dir, token)
    columns = dataset.column_names
    key_field = None
    if columns is not None:
        if text_field not in columns:
            raise ShardError(f"--text-field {text_field!r}: no such column in {spec.dataset or spec.files[0]} "
                             f"(columns: {', '.join(columns)})")
        key_field = ROUTE_KEY if need_key and ROUTE_KEY in columns and ROUTE_KEY != text_field else None
        dataset = dataset.select_columns([text_field] + ([key_field] if key_field else []))
    return Stream(spec, text_field, key_field, dataset.with_format("arrow"), token)
