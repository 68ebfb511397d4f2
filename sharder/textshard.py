"""Text shard format (version 1): UTF-8, one document per line, reversible escapes.

A document may hold any text; inside a shard line the three characters that would break the
one-document-per-line contract are escaped: backslash as ``\\\\``, newline as ``\\n``, carriage
return as ``\\r``. Nothing else is touched, so tabs, emoji, CJK and every other code point pass
through unchanged and ``unescape(escape(doc)) == doc`` for every string.

Lines end with ``\\n`` only. Readers must split on ``\\n`` alone (``newline="\\n"``), not
``str.splitlines`` which also splits on U+2028, form feed and others that documents may contain.
Shards are ``.txt`` or ``.txt.gz``.
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

FORMAT_VERSION = 1
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}
_ESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)


class TextShardError(ValueError):
    """A text shard line cannot be decoded; the message names the file and line."""


def escape(doc: str) -> str:
    """Encode one document as one shard line (without the trailing newline)."""
    if "\\" in doc:
        doc = doc.replace("\\", "\\\\")
    if "\n" in doc:
        doc = doc.replace("\n", "\\n")
    if "\r" in doc:
        doc = doc.replace("\r", "\\r")
    return doc


def encode_lines(texts: "pa.Array | pa.ChunkedArray", rows: "np.ndarray | None" = None) -> bytes:
    """UTF-8 shard lines for Arrow strings: ``"".join(escape(t) + "\\n" for t in texts)``, encoded.

    ``rows`` (sorted indices) selects some of them. Computed on the UTF-8 buffers in a few C passes
    rather than per document (3x faster than the Python loop on FineWeb-like text, and no Python
    string per document): each document gets a 0xFF terminator, a byte that never occurs in UTF-8,
    then the escapes and the terminator are substituted over the whole text. The selected rows are
    cut out of the terminated buffers as runs of consecutive rows while they are gathered into one
    (a copy made anyway), so selecting costs nothing and a chunked array is never concatenated.
    Selected strings must not be null.
    """
    import pyarrow as pa

    chunks = texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]
    selections = [(c, None) for c in chunks if len(c)] if rows is None else rows_by_chunk(chunks, rows)
    pieces = [_terminated(chunk, selected) for chunk, selected in selections]
    if not pieces:
        return b""
    if any(runs is None for runs in pieces):  # not valid UTF-8 after all
        return _encode_one_by_one(selections)
    runs = [run for chunk_runs in pieces for run in chunk_runs]
    data = bytes(runs[0]) if len(runs) == 1 else b"".join(runs)
    return _escape_bytes(data).replace(b"\xff", b"\n")


def rows_by_chunk(chunks: "list[pa.Array]", rows: "np.ndarray") -> "list[tuple[pa.Array, np.ndarray]]":
    """Sorted row indices of a chunked array as (chunk, indices within it), for the chunks they touch."""
    import numpy as np

    bounds = np.cumsum([0] + [len(chunk) for chunk in chunks])
    cuts = np.searchsorted(rows, bounds)  # where each chunk's rows start in ``rows``
    return [(chunk, rows[cuts[i] : cuts[i + 1]] - bounds[i]) for i, chunk in enumerate(chunks) if cuts[i] < cuts[i + 1]]


def _encode_one_by_one(selections: "list[tuple[pa.Array, np.ndarray | None]]") -> bytes:
    """encode_lines document by document, bytes as they are: for a batch that is not valid UTF-8."""
    lines = []
    for chunk, selected in selections:
        binary = binary_offsets(chunk)[0]
        docs = binary if selected is None else binary.take(selected)
        lines.extend(_escape_bytes(doc) + b"\n" for doc in docs.to_pylist())
    return b"".join(lines)


def binary_offsets(texts: "pa.Array") -> "tuple[pa.Array, np.ndarray]":
    """The same bytes as (large_)binary (a zero-copy cast: the text is already UTF-8) and its
    ``len + 1`` offsets into the values buffer, as int64."""
    import numpy as np
    import pyarrow as pa

    large = pa.types.is_large_string(texts.type) or pa.types.is_large_binary(texts.type)
    binary = texts.cast(pa.large_binary() if large else pa.binary())
    offsets = np.frombuffer(binary.buffers()[1], dtype=np.int64 if large else np.int32)
    return binary, offsets[binary.offset : binary.offset + len(binary) + 1].astype(np.int64)


def _terminated(chunk: "pa.Array", rows: "np.ndarray | None") -> "list[memoryview] | None":
    """Rows of a chunk (all when None), each followed by 0xFF, as views of one Arrow buffer, one per
    run of consecutive rows; None if the chunk holds a 0xFF byte."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    binary, offsets = binary_offsets(chunk)
    if binary.null_count:
        valid = np.asarray(binary.is_valid())
        if not (valid if rows is None else valid[rows]).all():
            raise ValueError("encode_lines: null documents")
    values = np.frombuffer(binary.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    if len(values) and values.max() == 0xFF:
        return None
    joined, ends = binary_offsets(
        pc.binary_join_element_wise(binary, pa.scalar(b"", binary.type), pa.scalar(b"\xff", binary.type)))
    view = memoryview(joined.buffers()[2])
    if rows is None:
        return [view[ends[0] : ends[-1]]]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    firsts, lasts = rows[np.r_[0, breaks]], rows[np.r_[breaks - 1, len(rows) - 1]]
    return [view[lo:hi] for lo, hi in zip(ends[firsts].tolist(), ends[lasts + 1].tolist())]


def _escape_bytes(data: bytes) -> bytes:
    """``escape`` on UTF-8 bytes (the three escaped characters are single ASCII bytes in UTF-8)."""
    return data.replace(b"\\", b"\\\\").replace(b"\r", b"\\r").replace(b"\n", b"\\n")


def _unescape_match(match: re.Match[str]) -> str:
    try:
        return _UNESCAPES[match.group(1)]
    except KeyError:
        raise TextShardError(f"unknown escape \\{match.group(1)}") from None


def unescape(line: str) -> str:
    """Decode one shard line (without its newline) back to the original document."""
    if "\\" not in line:
        return line
    if line.endswith("\\") and (len(line) - len(line.rstrip("\\"))) % 2 == 1:
        raise TextShardError("dangling backslash at end of line")
    return _ESCAPE_RE.sub(_unescape_match, line)


def open_text(path: str | Path, mode: str = "rt", gzip_level: int = 6) -> IO[str]:
    """Open a ``.txt`` or ``.txt.gz`` shard for text I/O with ``\\n`` as the only line break."""
    path = Path(path)
    if path.name.endswith(".gz"):
        raw = gzip.open(path, mode.replace("t", "") + "b", compresslevel=gzip_level) if "w" in mode else gzip.open(path, "rb")
        return io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
    return open(path, mode, encoding="utf-8", newline="\n")


def read_documents(path: str | Path) -> Iterator[str]:
    """Yield the documents of a text shard in order, unescaped."""
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.endswith("\n"):
                line = line[:-1]
            try:
                yield unescape(line)
            except TextShardError as exc:
                raise TextShardError(f"{path}:{lineno}: {exc}") from None
