"""Where a JSON Lines file is broken, as an editor counts: ``file:line``, 1-based.

pyarrow's JSON reader (under `datasets`' ``json`` builder) reports a parse error by its row inside
the block it was reading ("in row 164" for line 3000, "row 1" for the second line of a small
file), so a reader that fails on a file asks this module for the line instead.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def first_bad_line(path: str | Path) -> tuple[int, str] | None:
    """(line number, json's reason) of the first non-empty line of ``path`` that is not a JSON value;
    None when every line parses, or when the file is one JSON document rather than JSON Lines."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                found = number, f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
                break
        else:
            return None
    if ".jsonl" not in path.name:
        try:  # a .json file may be a whole document spread over lines: then the lines are not the problem
            with opener(path, "rt", encoding="utf-8") as fh:
                json.load(fh)
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return found


def describe_bad_line(paths: list[Path]) -> str | None:
    """``file:line: not valid JSON (reason)`` for the first broken line among ``paths``, or None."""
    for path in paths:
        found = first_bad_line(path)
        if found is not None:
            return f"{path}:{found[0]}: not valid JSON ({found[1]})"
    return None
