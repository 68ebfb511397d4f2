"""``manifest.json`` of a text shard directory (format version 1).

The manifest is the directory's table of contents and its resume point: the sharder rewrites
it atomically after every shard, so the shards it lists are always whole and the recorded
source position is exactly where the next shard starts. Downstream stages (tokenizer training,
encoding) read the shard list from here rather than globbing, and fingerprint it to detect a
stale tokenizer or token cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.atomic import atomic_write_json, read_versioned_json

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """The manifest is missing or malformed; the message names the file."""


@dataclass
class ShardEntry:
    """One whole shard: ``bytes`` and ``sha256`` are of the file as stored (compressed for .gz),
    ``text_bytes`` the UTF-8 size of its lines uncompressed (0 in manifests that predate it);
    ``sources`` how many documents and bytes (of the documents, unescaped) each recipe source gave."""

    name: str
    lines: int
    bytes: int
    sha256: str
    text_bytes: int = 0
    sources: dict[str, list[int]] | None = None  # recipe runs: source -> [documents, UTF-8 bytes]


@dataclass
class Manifest:
    """What a shard directory holds and where its source stopped (docs/data.md lists every key).

    ``settings`` is what a later run must match to add to the directory (source, mode, split,
    lines_per_shard, gzip, text_field, min_text_length, format_version; val_ratio and seed in
    split mode); ``resume`` the stream position after the last shard; ``complete`` is true once
    the source was exhausted or --take reached.
    """

    source: dict[str, Any]
    mode: str
    split: str
    settings: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardEntry] = field(default_factory=list)
    resume: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    version: int = MANIFEST_VERSION

    @property
    def total_lines(self) -> int:
        return sum(s.lines for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def total_text_bytes(self) -> int:
        return sum(s.text_bytes for s in self.shards)

    def source_totals(self) -> dict[str, list[int]] | None:
        """Documents and bytes per recipe source over every shard (None: not a recipe run)."""
        if not any(s.sources for s in self.shards):
            return None
        totals: dict[str, list[int]] = {}
        for shard in self.shards:
            for name, (docs, size) in (shard.sources or {}).items():
                entry = totals.setdefault(name, [0, 0])
                entry[0] += docs
                entry[1] += size
        return totals

    def shard_paths(self, directory: str | Path) -> list[Path]:
        return [Path(directory) / s.name for s in self.shards]

    def fingerprint(self) -> str:
        """Content identity of the shard set: names and sha256 of every shard, in order."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.name}\0{s.sha256}\n".encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["totals"] = {
            "shards": len(self.shards),
            "lines": self.total_lines,
            "bytes": self.total_bytes,
            "text_bytes": self.total_text_bytes,
        }
        sources = self.source_totals()
        if sources is not None:
            data["totals"]["sources"] = {k: {"documents": d, "bytes": b} for k, (d, b) in sources.items()}
        return data

    def save(self, directory: str | Path) -> None:
        atomic_write_json(Path(directory) / MANIFEST_NAME, self.to_dict())


def load_manifest(directory: str | Path) -> Manifest:
    """Read ``<directory>/manifest.json``; a missing or malformed file raises ManifestError."""
    path = Path(directory) / MANIFEST_NAME
    data = read_versioned_json(path, MANIFEST_VERSION, "no manifest (is this a shard directory?)", ManifestError)
    try:
        shards = [ShardEntry(**s) for s in data["shards"]]
        return Manifest(
            source=data["source"],
            mode=data["mode"],
            split=data["split"],
            settings=data.get("settings", {}),
            shards=shards,
            resume=data.get("resume", {}),
            complete=bool(data.get("complete", False)),
        )
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: malformed manifest: {exc}") from None
