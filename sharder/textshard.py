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
from typing import IO, Iterator

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
