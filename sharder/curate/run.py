"""``run_curate``: a text shard directory in, a curated one out, through datatrove executors.

Steps (each a datatrove ``LocalPipelineExecutor`` whose ``logging_dir`` holds its per-task
completion markers, so a killed run resumes at the first unfinished task):

1. ``scores``  perplexity side files (only with a perplexity filter), keyed by model and input;
2. ``filter``  named quality filters and the perplexity threshold, keyed by their settings;
3. ``dedup``   exact (normalised-text hash, datatrove's ExactDedup*) then MinHash (datatrove's
               MinhashDedup* 4 steps, FineWeb's 5-grams x 14 buckets x 8 hashes by default).

A step's work folder is named after the fingerprint of its settings and everything before it, so
changing a filter redoes the filter and the dedup after it, changing the dedup keeps the filtered
shards, and changing only a perplexity threshold reuses the scores. The output directory gets the
surviving documents under the input shard names and a manifest written last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sharder.errors import ShardError
from sharder.manifest import Manifest, ManifestError, ShardEntry, load_manifest
from sharder.output import shard_files, sources_file
from sharder.recipe import CurateConfig
from training.atomic import atomic_write_text

CURATE_VERSION = 1
WORK = ".curate"


def _fp(*parts: Any) -> str:
    """A short identity for a step's settings and inputs (names its work folder)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _normalised(doc: Any) -> bytes:
    """Exact dedup's key: datatrove's text normalisation (case, punctuation, digits, whitespace)."""
    from datatrove.utils.text import simplify_text

    return simplify_text(doc.text).encode()


def _execute(pipeline: list[Any], tasks: int, logs: Path, workers: int = 1) -> None:
    """Run one datatrove step list; its per-task logs go to ``logs/logs/`` and not the terminal
    (datatrove adds a stderr sink and progress bars for every task, which would bury our table)."""
    from datatrove.executor.local import LocalPipelineExecutor

    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logs),
                              start_method="fork").run()


def _entries(directory: Path, names: list[str], labels: list[str] | None) -> list[ShardEntry]:
    """Manifest entries of the shards in ``directory`` that hold documents, with per-source counts
    when the shards have sources side files."""
    import gzip
    import hashlib

    from sharder.curate.shardio import line_sources
    from sharder.textshard import read_documents

    entries = []
    for name in names:
        path = directory / name
        if not path.exists():  # every document of that shard was removed
            continue
        data = path.read_bytes()
        docs = list(read_documents(path))
        if not docs:
            continue
        text_bytes = len(gzip.decompress(data)) if name.endswith(".gz") else len(data)
        entry = ShardEntry(name, len(docs), len(data), hashlib.sha256(data).hexdigest(), text_bytes)
        sources = line_sources(path)
        if sources is not None and labels:
            entry.sources = {}
            for index, doc in zip(sources, docs):
                counts = entry.sources.setdefault(labels[int(index)], [0, 0])
                counts[0] += 1
                counts[1] += len(doc.encode())
        entries.append(entry)
    return entries


def source_labels(source: dict[str, Any]) -> list[str] | None:
    """The names of a recipe run's sources, by index (what the sources side files refer to)."""
    if source.get("type") == "recipe":
        from sharder.recipe import SourceConfig

        return [SourceConfig(**s).label for s in source.get("sources", [])]
    return source.get("labels")


def _pass(input_dir: Path, output_dir: Path, steps: list[Any], tasks: int, logs: Path, gzip: bool,
          names: list[str]) -> None:
    from sharder.curate.shardio import TextShardReader, TextShardWriter

    output_dir.mkdir(parents=True, exist_ok=True)
    shards = [str(input_dir / n) for n in names]
    _execute([TextShardReader(shards), *steps, TextShardWriter(str(output_dir), gzip)], tasks, logs, tasks)


def _dedup_steps(work: Path, config: Any, tasks: int, input_dir: Path, names: list[str], gzip: bool,
                 output_dir: Path) -> None:
    """Exact then MinHash dedup of ``input_dir`` into ``output_dir`` (datatrove's steps)."""
    from datatrove.pipeline.dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
    )

    from sharder.curate.shardio import TextShardReader

    shards = [str(input_dir / n) for n in names]
    before: list[Any] = []
    if config.exact:
        exact = ExactDedupConfig(content_getter=_normalised)
        _execute([TextShardReader(shards), ExactDedupSignature(str(work / "exact_sigs"), exact)], tasks,
                 work / "logs" / "exact_sigs", tasks)
        _execute([ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), exact)], 1,
                 work / "logs" / "exact_dups")
        before.append(ExactDedupFilter(str(work / "exact_dups"), exact))
    if config.minhash:
        minhash = minhash_config(config)
        _execute([TextShardReader(shards), *before, MinhashDedupSignature(str(work / "mh_sigs"), minhash)], tasks,
                 work / "logs" / "mh_sigs", tasks)
        _execute([MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=minhash)],
                 config.buckets, work / "logs" / "mh_buckets", tasks)
        _execute([MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"), config=minhash)], 1,
                 work / "logs" / "mh_remove")
        before.append(MinhashDedupFilter(str(work / "mh_remove")))
    _pass(input_dir, output_dir, before, tasks, work / "logs" / "write", gzip, names)


def minhash_config(config: Any) -> Any:
    """datatrove's MinhashConfig for the recipe's dedup settings.

    Shingles are hashed with sha1: datatrove 0.10's xxhash path passes ``str`` to xxhash, which
    xxhash 4 refuses ("Strings must be encoded before hashing").
    """
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    return MinhashConfig(n_grams=config.n_grams, num_buckets=config.buckets, hashes_per_bucket=config.hashes_per_bucket,
                         seed=config.seed, hash_config=HashConfig(precision=64, hash_fc="sha1"))


def run_curate(input_dir: Path, output_dir: Path, config: CurateConfig, console: Console | None = None) -> dict[str, Any]:
    """Curate the shards listed in ``input_dir``'s manifest into ``output_dir``; resumable, deterministic.

    Returns the summary (documents in and out, removed by each step, seconds, throughput).
    """
    from sharder.curate.perplexity import PerplexityFilter, PerplexityScorer, check_model, load_scores, threshold
    from sharder.curate.quality import quality_steps
    from sharder.curate.shardio import TextShardReader

    console = console or Console(stderr=True)
    try:
        source = load_manifest(input_dir)
    except ManifestError as exc:
        raise ShardError(f"curate input: {exc}") from None
    if not source.complete:
        raise ShardError(f"curate input {input_dir}: the shard run is not complete; finish it first")
    if config.perplexity is not None:
        check_model(config.perplexity)
    quality = quality_steps(config.quality)
    started = time.monotonic()
    names = [s.name for s in source.shards]
    gzip = any(n.endswith(".gz") for n in names)
    work = output_dir / WORK
    final_fp = _fp(CURATE_VERSION, source.fingerprint(), config.model_dump())
    marker = work / "output.fingerprint"
    if not marker.exists() or marker.read_text() != final_fp:
        for path in [*shard_files(output_dir), *output_dir.glob("shard_*.sources")]:
            path.unlink()
        (output_dir / "manifest.json").unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, final_fp)
    counts = {"input": source.total_lines}
    filter_steps: list[Any] = list(quality)
    filter_fp = _fp(source.fingerprint(), config.quality)
    if config.perplexity is not None:
        p = config.perplexity
        score_fp = _fp(source.fingerprint(), p.checkpoint, p.tag, p.tokenizer, p.kenlm_model, p.max_tokens)
        scores_dir = work / f"scores-{score_fp}"
        scores_dir.mkdir(parents=True, exist_ok=True)
        _execute([TextShardReader([str(input_dir / n) for n in names]), PerplexityScorer(p, str(scores_dir))],
                 config.tasks, scores_dir / "logs", config.tasks)
        limit = threshold(p, load_scores(scores_dir))
        counts["perplexity_threshold"] = round(limit, 3)
        filter_steps.append(PerplexityFilter(str(scores_dir), limit))
        filter_fp = _fp(filter_fp, score_fp, limit)
    current = input_dir
    if filter_steps:
        target = output_dir if config.dedup is None else work / f"filter-{filter_fp}"
        _pass(input_dir, target, filter_steps, config.tasks, work / f"filter-{filter_fp}-logs", gzip, names)
        current = target
        counts["after_filters"] = sum(e.lines for e in _entries(target, names, None))
    if config.dedup is not None:
        dedup_fp = _fp(filter_fp, config.dedup.model_dump(), config.tasks)
        left = [n for n in names if (current / n).exists()]  # the filters may have emptied a shard
        if left:
            _dedup_steps(work / f"dedup-{dedup_fp}", config.dedup, config.tasks, current, left, gzip, output_dir)
    elif current == input_dir:  # nothing to do: copy the shards as they are
        for n in names:
            for path in (input_dir / n, sources_file(input_dir / n)):
                if path.exists():
                    shutil.copyfile(path, output_dir / path.name)
    labels = source_labels(source.source)
    entries = _entries(output_dir, names, labels)
    manifest = Manifest(
        source={"type": "curated", "from": str(input_dir), "input_fingerprint": source.fingerprint(),
                "curate": config.model_dump(), "version": CURATE_VERSION, "labels": labels},
        mode=source.mode, split=source.split, settings=source.settings, shards=entries,
        resume={"curate_fingerprint": final_fp}, complete=True,
    )
    manifest.save(output_dir)
    seconds = time.monotonic() - started
    counts["output"] = manifest.total_lines
    counts["removed"] = counts["input"] - counts["output"]
    before, after = source.source_totals(), manifest.source_totals() or {}
    if before:
        counts["sources"] = {name: {"input": docs, "output": after.get(name, [0, 0])[0],
                                    "removed": docs - after.get(name, [0, 0])[0]} for name, (docs, _) in before.items()}
    summary = {**counts, "seconds": round(seconds, 2),
               "throughput": f"{counts['input'] / max(seconds, 1e-9):,.0f} docs/s"}
    console.print(_table(input_dir, counts, seconds))
    return summary


def _table(directory: Path, counts: dict[str, Any], seconds: float) -> Table:
    table = Table(title=f"curate {directory}")
    for col in ("step", "documents", "removed"):
        table.add_column(col, justify="right" if col != "step" else "left")
    previous = counts["input"]
    table.add_row("input", f"{previous:,}", "")
    for key in ("after_filters", "output"):
        if key in counts:
            table.add_row(key.replace("_", " "), f"{counts[key]:,}", f"{previous - counts[key]:,}")
            previous = counts[key]
    for name, per in counts.get("sources", {}).items():
        table.add_row(f"  source {name}", f"{per['input']:,} -> {per['output']:,}", f"{per['removed']:,}")
    table.caption = f"{seconds:.1f} s, {counts['input'] / max(seconds, 1e-9):,.0f} docs/s"
    return table
