"""A recipe's sources as one `datasets` stream: each source formatted, filtered, capped, then mixed.

Every source becomes an IterableDataset of two columns, the text and the source's index in the
recipe, through ``datasets``' own ``map``/``filter``/``take``; the sources are then combined with
``interleave_datasets`` (round_robin, weighted) or ``concatenate_datasets`` (sequential). The
result is one IterableDataset whose ``state_dict()`` covers every source's position, the
interleaving RNG and the budgets, so the sharder resumes a mixed stream exactly like a single one:
killed anywhere and rerun, every document lands once. The stopping strategy ``all_exhausted`` is
datasets' ``all_exhausted_without_replacement``: a finished source is left out, never restarted,
so no document is repeated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sharder.errors import ShardError
from sharder.pdf import generate_chunks, pdf_files
from sharder.recipe import Recipe, SourceConfig
from sharder.sources import SourceSpec, Stream, load_source, resolve_inputs

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import IterableDataset

# Output columns of every source: names no dataset uses, so removing the input columns never
# removes an output (in Arrow-format maps a removed name wins over an output of the same name).
TEXT_COLUMN = "_podtrain_text"
SOURCE_COLUMN = "_podtrain_source"
_STOPPING = {"first_exhausted": "first_exhausted", "all_exhausted": "all_exhausted_without_replacement"}


def source_label(recipe: Recipe, src: SourceConfig) -> str:
    """How errors name a recipe's source: the recipe file and the source (``--data r.yaml: source wiki``)."""
    return f"--data {recipe.path}: source {src.label}"


def check_local_sources(recipe: Recipe) -> None:
    """The recipe's files and pdf sources exist and can be opened; orchestrate calls this when it
    plans, so a glob matching nothing is reported before any stage, naming the recipe and source."""
    for src in recipe.sources:
        if src.type == "files":
            resolve_inputs([src.path or ""], where=source_label(recipe, src))
        elif src.type == "pdf":
            pdf_files(src.path or "")


def _raw(src: SourceConfig, where: str, cache_dir: str, token: str | None) -> "IterableDataset":
    if src.type == "pdf":
        from datasets import IterableDataset

        files = pdf_files(src.path or "")
        return IterableDataset.from_generator(
            generate_chunks, gen_kwargs={"files": files, "target": src.chunk_chars}
        )
    if src.type == "files":
        spec = resolve_inputs([src.path or ""], where=where)
    else:
        spec = SourceSpec(kind="hub", dataset=src.dataset, name=src.config, split=src.split, revision=src.revision,
                          data_dir=src.data_dir, label=where)
    return load_source(spec, cache_dir, token)


def _columns(dataset: "IterableDataset", where: str) -> list[str]:
    """Column names, from the dataset's features or (json without them) its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset.take(1)), None)
    if first is None:
        raise ShardError(f"{where}: no documents in the source")
    return list(first)


def _formatter(src: SourceConfig, index: int):
    """The batched Arrow map that builds the text (Q&A ``format`` over ``fields``, or the text column)."""
    import pyarrow as pa

    fields, template = src.fields, src.format

    def build(table: "pa.Table") -> "pa.Table":
        if fields is None:
            texts = table.column(src.text_field)
            if pa.types.is_null(texts.type):
                texts = texts.cast(pa.string())
        else:
            rows = zip(*(table.column(f).to_pylist() for f in fields))
            texts = pa.array([
                None if any(v is None for v in values) else template.format(**dict(zip(fields, values)))
                for values in rows
            ], pa.string())
        return pa.table({TEXT_COLUMN: texts, SOURCE_COLUMN: pa.array([index] * table.num_rows, pa.int64())})

    return build


def _long_enough(minimum: int):
    import pyarrow.compute as pc

    def keep(table: "pa.Table") -> "pa.Array":
        return pc.fill_null(pc.greater_equal(pc.utf8_length(table.column(TEXT_COLUMN)), minimum), False)

    return keep


def documents_within(dataset: "IterableDataset", budget: int, token_counter: str) -> int:
    """How many documents from the start of ``dataset`` (Arrow format) reach ``budget`` tokens.

    Each document counts its ids plus one end-of-text, as the token shards store it; the last
    document taken is the one that reaches the budget. A token budget becomes a document ``take``
    because ``take``'s position is part of the stream's ``state_dict()`` (a running token count
    inside the stream would not be, and a resumed run would cut elsewhere); the price is one
    tokenizing pass over the budgeted prefix each time the stream is opened.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(token_counter)
    total = taken = 0
    for batch in dataset.iter(batch_size=1000):
        for encoding in tokenizer.encode_batch_fast(batch.column(TEXT_COLUMN).to_pylist(), add_special_tokens=False):
            taken += 1
            total += len(encoding.ids) + 1
            if total >= budget:
                return taken
    return taken


def source_dataset(src: SourceConfig, index: int, min_length: int, where: str,
                   cache_dir: str, token: str | None, token_counter: str | None = None) -> "IterableDataset":
    """One source as text + source-index rows, short documents dropped, capped at ``limit`` documents
    and ``limit_tokens`` tokens (counted with ``token_counter``)."""
    dataset = _raw(src, where, cache_dir, token)
    columns = _columns(dataset, where)
    needed = src.fields or [src.text_field]
    missing = [f for f in needed if f not in columns]
    if missing:
        key = "fields" if src.fields else "text_field"
        raise ShardError(f"{where}: {key}: no field {missing[0]!r} in {src.label} (fields: {', '.join(columns)})")
    # Arrow-format map and filter keep the whole chain on datasets' Arrow path, interleaving
    # included: 2.5-3x the documents per second of the Python-row path (docs/performance.md).
    dataset = dataset.with_format("arrow").map(_formatter(src, index), batched=True, remove_columns=columns)
    dataset = dataset.filter(_long_enough(max(min_length, 1)), batched=True)
    limits = [] if src.limit is None else [src.limit]
    if src.limit_tokens is not None:
        assert token_counter is not None, "recipe validation requires data.token_counter for token budgets"
        limits.append(documents_within(dataset, src.limit_tokens, token_counter))
    return dataset.take(min(limits)) if limits else dataset


def mixed_dataset(recipe: Recipe, cache_dir: str, token: str | None) -> "IterableDataset":
    """The recipe's sources mixed into one resumable stream."""
    from datasets import concatenate_datasets, interleave_datasets

    parts = [
        source_dataset(src, i, recipe.min_text_length, source_label(recipe, src), cache_dir, token, recipe.token_counter)
        for i, src in enumerate(recipe.sources)
    ]
    if len(parts) == 1:
        return parts[0]
    if recipe.mix_strategy == "sequential":
        return concatenate_datasets(parts)
    probabilities = recipe.weights if recipe.mix_strategy == "weighted" else None
    return interleave_datasets(
        parts, probabilities=probabilities, seed=recipe.seed, stopping_strategy=_STOPPING[recipe.stop]
    )


def open_recipe_stream(recipe: Recipe, cache_dir: str, token: str | None) -> Stream:
    """The mixed stream in the sharder's Stream wrapper (Arrow batches, positions, source indices)."""
    spec = SourceSpec(kind="recipe", dataset=recipe.path, label=f"--data {recipe.path}")
    dataset = mixed_dataset(recipe, cache_dir, token)
    return Stream(spec, TEXT_COLUMN, None, dataset.with_format("arrow"), token, source_field=SOURCE_COLUMN)
