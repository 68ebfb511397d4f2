"""``ShardOptions``: every flag of ``fineweb-sharder`` as one validated object.

The CLI builds one from its flags and the orchestrator builds one directly; validation lives here
once, and its errors name the CLI flag, which is how users meet them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharder.errors import ShardError
from sharder.sources import DEFAULT_DATASET
from sharder.textshard import FORMAT_VERSION

MODES = ("smoke", "prod", "split")
SMOKE_TAKE = 10_000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ShardOptions:
    """Every flag of ``fineweb-sharder``; invalid values raise ShardError naming the flag.

    ``take`` None means 10000 in smoke mode and no limit otherwise. ``input`` None streams the hub
    dataset ``dataset`` (default HuggingFaceFW/fineweb) with config ``name``.
    """

    mode: str = "smoke"
    split: str = "train"
    lines_per_shard: int = 50_000
    take: int | None = None
    val_ratio: float = 0.01
    gzip: bool = False
    dataset: str | None = None
    name: str | None = None
    text_field: str = "text"
    input: list[str] | None = None
    output_dir: Path | None = None
    experiment: str = "default"
    min_text_length: int = 1
    workspace: Path = Path("workspace")
    overwrite: bool = False
    seed: int = 0
    source_split: str = "train"
    source_label: str | None = None  # names a hub source in errors as the caller's flag (orchestrate: --input hf:...)
    data: str | Path | None = None  # a recipe file (--data): mixed sources instead of --input/--dataset
    dataset_limit: str | None = None  # --dataset-limit name=N,...: documents per recipe source, over the file's limits
    recipe: Any = field(default=None, init=False)  # the validated Recipe of ``data``

    def __post_init__(self) -> None:
        if isinstance(self.input, (str, Path)):
            self.input = [self.input]
        if self.input is not None:
            self.input = [str(p) for p in self.input]
        self.workspace = Path(self.workspace)
        self.output_dir = Path(self.output_dir) if self.output_dir is not None else None
        if self.mode not in MODES:
            raise ShardError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.lines_per_shard < 1:
            raise ShardError(f"--lines-per-shard {self.lines_per_shard}: must be at least 1")
        if self.take is not None and self.take < 1:
            raise ShardError(f"--take {self.take}: must be at least 1")
        if self.mode == "split" and not 0.0 < self.val_ratio < 1.0:
            raise ShardError(f"--val-ratio {self.val_ratio}: must be between 0 and 1 (exclusive) in split mode")
        if self.min_text_length < 0:
            raise ShardError(f"--min-text-length {self.min_text_length}: must be 0 or more")
        for flag, value in (("--split", self.split), ("--experiment", self.experiment)):
            if not _NAME_RE.match(value):
                raise ShardError(f"{flag} {value!r}: use letters, digits, '.', '_' or '-' (it names a directory)")
        if self.data is not None:
            from sharder.recipe import load_recipe

            if self.input is not None or self.dataset is not None or self.name is not None:
                raise ShardError("--data and --input/--dataset/--name are exclusive: a recipe names its own sources")
            if self.text_field != "text":
                raise ShardError("--text-field: not used with --data (each recipe source names its own text_field)")
            self.recipe = load_recipe(self.data, self.dataset_limit)  # checked whole, before any work
        elif self.dataset_limit is not None:
            raise ShardError("--dataset-limit: budgets recipe sources by name; give the recipe with --data")
        elif self.input is not None:
            if not self.input:
                raise ShardError("--input: no file given")
            if self.dataset is not None or self.name is not None or self.source_split != "train":
                raise ShardError(
                    "--input and --dataset/--name/--source-split are exclusive: shard local files or a dataset"
                )
        elif self.dataset is None:
            self.dataset = DEFAULT_DATASET
        if not self.text_field:
            raise ShardError("--text-field: must not be empty")

    @property
    def effective_take(self) -> int | None:
        return self.take if self.take is not None or self.mode != "smoke" else SMOKE_TAKE

    def output_dirs(self) -> dict[str, Path]:
        """Output split -> directory: train and val in split mode, ``--split`` otherwise."""
        splits = ("train", "val") if self.mode == "split" else (self.split,)
        if self.output_dir is not None:
            if self.mode == "split":
                return {s: self.output_dir / s for s in splits}
            return {self.split: self.output_dir}
        return {s: self.workspace / "datasets" / s / self.experiment for s in splits}

    def settings(self, source: dict[str, Any], split: str) -> dict[str, Any]:
        """What must match for a directory to be resumed rather than refused."""
        settings: dict[str, Any] = {
            "source": source,
            "mode": self.mode,
            "split": split,
            "lines_per_shard": self.lines_per_shard,
            "gzip": self.gzip,
            "text_field": self.text_field,
            "min_text_length": self.min_text_length,
            "format_version": FORMAT_VERSION,
        }
        if self.mode == "split":
            settings.update(val_ratio=self.val_ratio, seed=self.seed)
        return settings
