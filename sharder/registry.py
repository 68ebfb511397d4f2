"""The registry of named sources (``configs/sources.yaml``), optionally extended by a user's file.

A recipe says ``sources: [wikipedia, fineweb-edu]``; the registry turns each name into the hub
dataset, config, split and text column (or Q&A fields) that a custom ``{type: hf}`` source would
spell out. The shipped file lives beside the presets so users can read and copy it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharder.errors import ShardError
from sharder.source_config import SourceConfig
from training.config import ConfigError, read_config_file


SHIPPED_REGISTRY = Path(__file__).resolve().parents[1] / "configs" / "sources.yaml"
REGISTRY_VERSION = 1
_SOURCE_KEYS = ("dataset", "config", "split", "revision", "data_dir", "text_field", "fields", "format")
_ENTRY_KEYS = {*_SOURCE_KEYS, "columns"}


@dataclass
class Registry:
    """Name -> entry (the YAML mapping as written) for every known source."""

    entries: dict[str, dict[str, Any]]

    def source(self, name: str, where: str) -> SourceConfig:
        """The SourceConfig of ``name``; an unknown name is a ShardError naming ``where``."""

        entry = self.entries.get(name)
        if entry is None:
            raise ShardError(f"{where}: unknown source {name!r} (known: {', '.join(sorted(self.entries))})")
        keys = {k: entry[k] for k in _SOURCE_KEYS if k in entry}
        return SourceConfig(type="hf", name=name, **keys)


def _read_entries(path: Path) -> dict[str, dict[str, Any]]:
    try:
        raw = read_config_file(path)
    except ConfigError as exc:
        raise ShardError(f"data.registry {exc}") from None
    sources = raw.get("sources")
    if raw.get("version", REGISTRY_VERSION) != REGISTRY_VERSION or not isinstance(sources, dict):
        raise ShardError(f"{path}: sources: expected a mapping of names (registry version {REGISTRY_VERSION})")
    for name, entry in sources.items():
        if not isinstance(entry, dict) or "dataset" not in entry:
            raise ShardError(f"{path}: sources.{name}: needs at least 'dataset'")
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise ShardError(f"{path}: sources.{name}.{unknown[0]}: unknown key (known: {', '.join(sorted(_ENTRY_KEYS))})")
    return sources


def load_registry(user_file: Path | None = None) -> Registry:
    """The shipped registry, with ``user_file``'s names added (a same name replaces the shipped one)."""
    entries = dict(_read_entries(SHIPPED_REGISTRY))
    if user_file is not None:
        if not user_file.is_file():
            raise ShardError(f"data.registry {user_file}: no such file")
        entries.update(_read_entries(user_file))
    return Registry(entries)
