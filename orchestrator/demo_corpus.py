"""The embedded default corpus: real text every Python install has, built on the spot, no download.

Documents, in a fixed order then shuffled with a fixed seed: the interpreter's documentation topics
(``pydoc_data.topics``, the text behind ``help()``), every standard-library docstring of some
length, and the standard library's module sources, until ``target_bytes`` of UTF-8 is reached.
Written as JSON lines (``id``, ``text``) so documents keep their newlines.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path
from typing import Iterator

from training.atomic import atomic_open

CORPUS_VERSION = 1
_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if not _SKIP_PARTS & set(p.relative_to(root).parts)]


def iter_documents() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name]
    files = _stdlib_files()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    yield f"doc:{path.stem}:{getattr(node, 'name', '')}:{getattr(node, 'lineno', 0)}", doc
    for path in files:
        try:
            yield f"src:{path.stem}", path.read_text(encoding="utf-8")[:40_000]
        except (UnicodeDecodeError, OSError):
            continue


def build_corpus(path: str | Path, target_bytes: int = 6_000_000, seed: int = 0) -> tuple[int, int]:
    """Write the corpus to ``path`` (atomically); returns (documents, bytes)."""
    docs, total = [], 0
    for doc_id, text in iter_documents():
        text = text.strip()
        if not text:
            continue
        docs.append({"id": doc_id, "text": text})
        total += len(text.encode("utf-8"))
        if total >= target_bytes:
            break
    random.Random(seed).shuffle(docs)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return len(docs), total
