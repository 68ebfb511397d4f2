"""A data recipe: which sources, how each becomes text, how they mix, and how the result is curated.

A recipe is the ``data:`` section of seed 000, in its own YAML/JSON file or inside a preset or
training config. It is validated whole before any work starts, and every error is one line naming
the file and the key (``recipe.yaml: data.source_weights: 3 weights for 2 sources``).
Registry names (``wikipedia``) are resolved here into the same :class:`SourceConfig` a custom
``{type: hf, ...}`` entry gives, so everything after this module sees one kind of source.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from sharder.errors import ShardError
from sharder.registry import Registry, load_registry
from sharder.source_config import SourceConfig, Strict
from training.config import ConfigError, format_validation_error, read_config_file

RECIPE_VERSION = 1
MIX_STRATEGIES = ("round_robin", "sequential", "weighted")


# MinHash settings by name. A pair of documents whose shingle sets have Jaccard similarity J is caught
# with probability 1 - (1 - J^hashes_per_bucket)^buckets. ``fineweb`` is FineWeb's (92% of pairs at
# J = 0.8, half at 0.69: reposted pages); ``light_edits`` removes >= 95% of copies with 1-5% of their
# words replaced, whose 5-gram Jaccard falls to ~0.63 (docs/data.md has the measured table).
MINHASH_PRESETS: dict[str, dict[str, int]] = {
    "fineweb": {"n_grams": 5, "buckets": 14, "hashes_per_bucket": 8},
    "light_edits": {"n_grams": 3, "buckets": 20, "hashes_per_bucket": 5},
}


class DedupConfig(Strict):
    """Exact (normalised-text hash) and MinHash near-duplicate removal; FineWeb's settings by default.

    ``preset`` names the MinHash settings; ``n_grams``, ``buckets`` and ``hashes_per_bucket`` given
    next to it override that one value.
    """

    exact: bool = True
    minhash: bool = True
    preset: Literal["fineweb", "light_edits"] = "fineweb"
    n_grams: int | None = Field(None, ge=1)
    buckets: int | None = Field(None, ge=1)
    hashes_per_bucket: int | None = Field(None, ge=1)
    seed: int = 1

    @model_validator(mode="after")
    def _fill_from_preset(self) -> "DedupConfig":
        for key, value in MINHASH_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        return self


class PerplexityConfig(Strict):
    """Score each document with a reference model; drop by ``max_perplexity`` or ``drop_percentile``."""

    checkpoint: str | None = None  # a podtrain checkpoint directory (holding <tag>.safetensors)
    tag: str = "final"
    tokenizer: str | None = None  # tokenizer.json for the checkpoint
    kenlm_model: str | None = None  # a KenLM .arpa/.bin, used when given
    max_perplexity: float | None = Field(None, gt=0)
    drop_percentile: float | None = Field(None, gt=0, lt=100)
    max_tokens: int = Field(512, ge=8, description="tokens scored per document")

    @model_validator(mode="after")
    def _one_model_one_rule(self) -> "PerplexityConfig":
        if (self.checkpoint is None) == (self.kenlm_model is None):
            raise ValueError("give exactly one of 'checkpoint' or 'kenlm_model'")
        if self.checkpoint is not None and self.tokenizer is None:
            raise ValueError("'checkpoint' needs 'tokenizer' (the tokenizer.json it was trained with)")
        if (self.max_perplexity is None) == (self.drop_percentile is None):
            raise ValueError("give exactly one of 'max_perplexity' or 'drop_percentile'")
        return self


class CurateConfig(Strict):
    """The curate stage: dedup, named quality filters (with their options), perplexity filter."""

    dedup: DedupConfig | None = None
    quality: dict[str, dict[str, Any]] = Field(default_factory=dict)
    perplexity: PerplexityConfig | None = None
    tasks: int = Field(1, ge=1, description="datatrove tasks (parallel workers) for each step")
    executor: Literal["local", "slurm", "ray"] = "local"
    executor_options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of datatrove's executor class

    @model_validator(mode="after")
    def _executor_options(self) -> "CurateConfig":
        """Options are checked against the datatrove class, so a typo fails before any work."""
        if self.executor == "local":
            if self.executor_options:
                raise ValueError("executor_options: only used by executor slurm or ray")
            return self
        try:
            if self.executor == "slurm":
                from datatrove.executor.slurm import SlurmPipelineExecutor as cls
            else:
                import ray  # noqa: F401  (datatrove's Ray executor needs it)
                from datatrove.executor.ray import RayPipelineExecutor as cls
        except ImportError as exc:
            raise ValueError(f"executor {self.executor}: needs {exc.name} (pip install 'datatrove[{self.executor}]')") from None
        import inspect

        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "pipeline", "tasks", "logging_dir", "depends"}
        unknown = sorted(set(self.executor_options) - accepted)
        if unknown:
            raise ValueError(f"executor_options.{unknown[0]}: not an option of {cls.__name__} ({', '.join(sorted(accepted))})")
        required = sorted(n for n, p in inspect.signature(cls.__init__).parameters.items()
                          if n in accepted and p.default is inspect.Parameter.empty)
        missing = [n for n in required if n not in self.executor_options]
        if missing:
            raise ValueError(f"executor_options: {cls.__name__} needs {', '.join(missing)}")
        return self

    @field_validator("quality", mode="before")
    @classmethod
    def _names_as_list(cls, value: Any) -> Any:
        """``quality: [gopher_quality, c4]`` is ``quality: {gopher_quality: {}, c4: {}}``."""
        if isinstance(value, list):
            return {str(name): {} for name in value}
        return {k: (v or {}) for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("quality")
    @classmethod
    def _known_filters(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from sharder.curate.quality import QUALITY_FILTERS

        for name in value:
            if name not in QUALITY_FILTERS:
                raise ValueError(f"unknown quality filter {name!r} (known: {', '.join(QUALITY_FILTERS)})")
        return value

    @property
    def active(self) -> bool:
        return bool(self.dedup or self.quality or self.perplexity)


class Budget(Strict):
    """A per-source budget in ``limits``: documents or tokens (a plain number means documents)."""

    documents: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> "Budget":
        if (self.documents is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'documents' or 'tokens'")
        return self


class DataSection(Strict):
    """The ``data:`` section as users write it."""

    sources: list[Union[str, dict[str, Any]]] = Field(default_factory=list)  # names or SourceConfig mappings
    custom_sources: list[dict[str, Any]] = Field(default_factory=list)  # SourceConfig mappings
    registry: str | None = None
    mix_strategy: Literal["round_robin", "sequential", "weighted"] = "round_robin"
    source_weights: list[float] | None = None
    limits: dict[str, Budget] = Field(default_factory=dict)
    token_counter: str | None = None  # tokenizer.json (or a folder holding one) that counts token budgets
    min_text_length: int = Field(1, ge=0)
    stop: Literal["first_exhausted", "all_exhausted"] | None = None
    seed: int = 0
    curate: CurateConfig | None = None

    @field_validator("limits", mode="before")
    @classmethod
    def _documents_by_default(cls, value: Any) -> Any:
        """``limits: {wikipedia: 350}`` (seed 004's ``--dataset-limit wikipedia=350``) counts documents."""
        if isinstance(value, dict):
            return {k: {"documents": v} if isinstance(v, int) and not isinstance(v, bool) else v for k, v in value.items()}
        return value

    @field_validator("source_weights")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(w <= 0 for w in value)):
            raise ValueError("weights must be positive numbers")
        return value


class _Recipe(Strict):
    """The ``data:`` key around a section, so error paths read ``data.mix_strategy``."""

    data: DataSection


class Recipe(BaseModel):
    """A validated recipe: resolved sources in mixing order, plus the mixing and curation settings."""

    path: str
    sources: list[SourceConfig]
    mix_strategy: str
    weights: list[float] | None
    min_text_length: int
    stop: str  # first_exhausted | all_exhausted (never repeats a document)
    seed: int
    curate: CurateConfig | None
    token_counter: str | None = None  # resolved path of the tokenizer.json counting token budgets
    token_counter_sha256: str | None = None

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sources]

    def mix_settings(self) -> dict[str, Any]:
        """Everything that decides the mixed stream (what the sharder's fingerprint covers)."""
        return {
            "version": RECIPE_VERSION,
            "sources": [s.model_dump(exclude_none=True) for s in self.sources],
            "mix_strategy": self.mix_strategy,
            "weights": self.weights,
            "min_text_length": self.min_text_length,
            "stop": self.stop,
            "seed": self.seed,
            **({"token_counter_sha256": self.token_counter_sha256} if self.token_counter_sha256 else {}),
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.mix_settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source`` for a mixed run: the fingerprint and what it covers."""
        return {"type": "recipe", "fingerprint": self.fingerprint(), **self.mix_settings()}


def _custom(item: dict[str, Any], where: str) -> SourceConfig:
    """A custom source mapping, its errors prefixed with where it sits (``r.yaml: data.sources[1]``)."""
    try:
        return SourceConfig.model_validate(item)
    except ValidationError as exc:
        file, key = where.split(": ", 1)
        parts = []
        for err in exc.errors():  # format_validation_error's wording, with the key path under ``key``
            one = format_validation_error(ValidationError.from_exception_data(exc.title, [err]), "")[2:]
            parts.append(f"{key}.{one}" if err["loc"] else f"{key}: {one}")
        raise ShardError(f"{file}: " + "; ".join(parts)) from None


def _resolve(section: DataSection, registry: Registry, where: str) -> list[SourceConfig]:
    resolved: list[SourceConfig] = []
    for i, item in enumerate(section.sources):
        here = f"{where}: data.sources[{i}]"
        resolved.append(registry.source(item, here) if isinstance(item, str) else _custom(item, here))
    resolved.extend(_custom(item, f"{where}: data.custom_sources[{i}]") for i, item in enumerate(section.custom_sources))
    if not resolved:
        raise ShardError(f"{where}: data.sources: no source (name one from the registry or add data.custom_sources)")
    seen: dict[str, int] = {}
    for i, src in enumerate(resolved):
        if src.label in seen:
            raise ShardError(f"{where}: data.sources: {src.label!r} appears twice; give one a distinct 'name'")
        seen[src.label] = i
    for name, limit in section.limits.items():
        if name not in seen:
            raise ShardError(f"{where}: data.limits.{name}: no such source (sources: {', '.join(seen)})")
        update = {"limit": limit.documents} if limit.documents else {"limit_tokens": limit.tokens}
        resolved[seen[name]] = resolved[seen[name]].model_copy(update=update)
    return resolved


def _token_counter(section: DataSection, sources: list[SourceConfig], where: str, base: Path) -> tuple[str, str] | None:
    """The tokenizer.json that counts token budgets, and its sha256 (part of the recipe's identity:
    another tokenizer gives other budgets), checked to load; None when no source has one."""
    budgeted = [s.label for s in sources if s.limit_tokens is not None]
    if section.token_counter is None:
        if budgeted:
            raise ShardError(f"{where}: data.token_counter: needed by the budget in tokens of {budgeted[0]} "
                             f"(a tokenizer.json, or a folder holding one, to count with)")
        return None
    path = Path(section.token_counter)
    path = path if path.is_absolute() else base / path
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ShardError(f"{where}: data.token_counter: no such file {path}")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise ShardError(f"{where}: data.token_counter: {path} is not a tokenizers tokenizer.json ({exc})") from None
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def recipe_from_mapping(data: dict[str, Any], where: str, base: Path) -> Recipe:
    """Validate a ``data:`` section (``where`` names its file; relative paths resolve from ``base``)."""
    try:
        section = _Recipe.model_validate({"data": data}).data
    except ValidationError as exc:
        raise ShardError(format_validation_error(exc, where)) from None
    registry_file = None
    if section.registry:
        registry_file = Path(section.registry)
        registry_file = registry_file if registry_file.is_absolute() else base / registry_file
    registry = load_registry(registry_file)
    sources = _resolve(section, registry, where)
    sources = [
        s.model_copy(update={"path": str(base / s.path)}) if s.path and not Path(s.path).is_absolute() else s
        for s in sources
    ]
    if section.mix_strategy == "weighted":
        if section.source_weights is None:
            raise ShardError(f"{where}: data.source_weights: required by mix_strategy weighted")
        if len(section.source_weights) != len(sources):
            raise ShardError(
                f"{where}: data.source_weights: {len(section.source_weights)} weights for {len(sources)} sources "
                f"({', '.join(s.label for s in sources)})"
            )
    elif section.source_weights is not None:
        raise ShardError(f"{where}: data.source_weights: only used by mix_strategy weighted (got {section.mix_strategy})")
    stop = section.stop or ("first_exhausted" if section.mix_strategy == "weighted" else "all_exhausted")
    counter = _token_counter(section, sources, where, base)
    weights = None
    if section.source_weights:
        total = sum(section.source_weights)
        weights = [w / total for w in section.source_weights]
    return Recipe(
        path=where, sources=sources, mix_strategy=section.mix_strategy, weights=weights,
        min_text_length=section.min_text_length, stop=stop, seed=section.seed, curate=section.curate,
        token_counter=counter[0] if counter else None, token_counter_sha256=counter[1] if counter else None,
    )


def parse_dataset_limits(text: str) -> dict[str, int]:
    """``fineweb=350,wikipedia=350`` -> {"fineweb": 350, "wikipedia": 350}: seed 004's ``--dataset-limit``
    (documents per source); a malformed item is a ValueError naming it."""
    limits: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--dataset-limit {text!r}: expected name=N,... with N >= 1 (got {item!r})")
        if name.strip() in limits:
            raise ValueError(f"--dataset-limit {text!r}: {name.strip()} is given twice; give each source once")
        limits[name.strip()] = int(value)
    if not limits:
        raise ValueError(f"--dataset-limit {text!r}: expected name=N,... with N >= 1")
    return limits


def load_recipe(path: str | Path, dataset_limit: str | None = None) -> Recipe:
    """Read a recipe file: its ``data:`` section (a preset or training config) or the whole file.

    ``dataset_limit`` (``name=N,...``, the command line's ``--dataset-limit``) sets those sources'
    budgets to N documents over what the file says, so one recipe serves a smoke run and a full one."""
    path = Path(path)
    try:
        raw = read_config_file(path)
    except ConfigError as exc:
        raise ShardError(f"--data {exc}") from None
    data = raw.get("data", raw) if isinstance(raw.get("data"), dict) else raw
    if "data" in raw and not isinstance(raw["data"], dict):
        raise ShardError(f"{path}: data: must be a mapping (sources, mix_strategy, ...)")
    if dataset_limit is not None:
        try:
            limits = parse_dataset_limits(dataset_limit)
        except ValueError as exc:
            raise ShardError(str(exc)) from None
        data = {**data, "limits": {**(data.get("limits") or {}), **limits}}
    return recipe_from_mapping(data, str(path), path.resolve().parent)
