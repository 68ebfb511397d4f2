"""PDF folders as a source: text extracted with pypdf, cut into chunks of about 3-5k characters.

Chunks end at paragraph boundaries (a blank line, else a line end) so a document never stops in
the middle of a sentence when it can be helped; a paragraph longer than the upper bound is cut at
the last space before it. Each chunk keeps its file and page range, which the source dataset
carries as columns next to the text.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Iterator

from sharder.errors import ShardError

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_ENDS = (".", "!", "?", ":", '."', '!"', '?"')


def pdf_files(path: str) -> list[str]:
    """Every ``.pdf`` under ``path`` (recursive, sorted: the order fixes the stream), or the file itself."""
    root = Path(path)
    if root.is_file():
        return [str(root)]
    if not root.is_dir():
        raise ShardError(f"pdf source {path}: no such file or directory")
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf")
    if not files:
        raise ShardError(f"pdf source {path}: holds no .pdf file")
    return files


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs; without blank lines (pypdf's usual output) a paragraph ends
    at a line that ends a sentence."""
    parts = _PARAGRAPH_BREAK.split(text)
    if len(parts) == 1:
        parts, lines = [], []
        for line in text.split("\n"):
            lines.append(line.strip())
            if line.rstrip().endswith(_SENTENCE_ENDS):
                parts.append("\n".join(lines))
                lines = []
        parts.append("\n".join(lines))
    return [p.strip() for p in parts if p.strip()]


def _cut_long(paragraph: str, upper: int) -> list[str]:
    pieces = []
    while len(paragraph) > upper:
        cut = paragraph.rfind(" ", 0, upper)
        cut = cut if cut > upper // 2 else upper
        pieces.append(paragraph[:cut].strip())
        paragraph = paragraph[cut:].strip()
    return pieces + ([paragraph] if paragraph else [])


def chunk_pages(pages: list[str], target: int) -> Iterator[tuple[str, int, int]]:
    """(chunk, first page, last page), 1-based; chunks of ``0.75*target`` to ``1.25*target`` characters
    except the last of a file."""
    lower, upper = int(target * 0.75), int(target * 1.25)
    buffer: list[str] = []
    size, first = 0, 1
    for number, page in enumerate(pages, start=1):
        for paragraph in _paragraphs(page):
            for piece in _cut_long(paragraph, upper):
                if buffer and size + len(piece) + 2 > upper:
                    yield "\n\n".join(buffer), first, number
                    buffer, size = [], 0
                if not buffer:
                    first = number
                buffer.append(piece)
                size += len(piece) + 2
                if size >= lower:
                    yield "\n\n".join(buffer), first, number
                    buffer, size = [], 0
    if buffer:
        yield "\n\n".join(buffer), first, len(pages)


def generate_chunks(files: list[str], target: int) -> Iterator[dict[str, object]]:
    """The rows of a PDF source (a `datasets` generator: one shard per file in ``files``)."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    for path in files:
        try:
            with _pypdf_quiet():
                pages = [page.extract_text() or "" for page in PdfReader(path).pages]
        except (PdfReadError, OSError, ValueError) as exc:
            raise ShardError(f"pdf source {path}: cannot read: {exc}") from None
        for text, first, last in chunk_pages(pages, target):
            yield {"text": text, "file": path, "page": first, "last_page": last}


@contextlib.contextmanager
def _pypdf_quiet() -> Iterator[None]:
    """pypdf logs what it repairs or gives up on ("EOF marker not found"): a corrupt file is our one
    line (ShardError), a repaired one reads as any other, so its log lines are noise before either."""
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
