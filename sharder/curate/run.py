"""``run_curate``: a text shard directory in, a curated one out, through datatrove executors.

Steps (each run by a datatrove executor, local by default, Slurm or Ray when the recipe says so,
whose ``logging_dir`` holds its per-task completion markers, so a killed run resumes at the first
unfinished task):

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
from dataclasses import dataclass
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


@dataclass
class Step:
    """One datatrove step list run as ``tasks`` tasks; ``logs`` holds its per-task completion markers."""

    name: str  # names the cluster job: podtrain-curate-<name>
    pipeline: list[Any]
    tasks: int
    logs: Path
    workers: int = 1

    def done(self) -> bool:
        return all((self.logs / "completions" / f"{rank:05d}").exists() for rank in range(self.tasks))


class CurateLaunched(ShardError):
    """Steps were handed to a cluster executor that returns at once (Slurm): rerun when they finish.

    ``exit_code`` 75 (EX_TEMPFAIL, "try again later"): nothing is wrong and nothing is done yet;
    ``orchestrate`` exits with it too when its curate stage submits.
    """

    exit_code = 75


def executors(steps: list[Step], config: CurateConfig) -> list[Any]:
    """The datatrove executor of ``config.executor`` for each step, each depending on the one before.

    ``local`` runs a step's tasks in this process and its forks; ``slurm`` and ``ray`` get datatrove's
    own executors with ``config.executor_options`` (partition, time, cpus_per_task, ...) and a
    ``depends`` chain, so the cluster starts a step only after the previous one has finished.
    """
    built: list[Any] = []
    for step in steps:
        if config.executor == "local":
            from datatrove.executor.local import LocalPipelineExecutor

            built.append(LocalPipelineExecutor(pipeline=step.pipeline, tasks=step.tasks,
                                               workers=min(step.workers, step.tasks), logging_dir=str(step.logs),
                                               start_method="fork"))
            continue
        if config.executor == "slurm":
            from datatrove.executor.slurm import SlurmPipelineExecutor as cls
        else:
            from datatrove.executor.ray import RayPipelineExecutor as cls
        options = {"job_name": f"podtrain-curate-{step.name}"} if config.executor == "slurm" else {}
        built.append(cls(pipeline=step.pipeline, tasks=step.tasks, logging_dir=str(step.logs),
                         depends=built[-1] if built else None, **{**options, **config.executor_options}))
    return built


def _run_steps(steps: list[Step], config: CurateConfig) -> None:
    """Run ``steps`` in order on the recipe's executor; each skips the tasks already marked complete.

    datatrove adds a stderr sink and progress bars for every task, which would bury our table, so a
    local run's task logs go to ``logs/logs/`` only. Slurm's launch returns at once: the steps left
    are submitted as one dependent chain and ``CurateLaunched`` says to rerun once they are done.
    """
    pending = [step for step in steps if not step.done()]
    if not pending:
        return
    chain = executors(pending, config)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        if config.executor == "local":
            for executor in chain:
                executor.run()
        else:
            chain[-1].run()  # launches (Slurm) or runs (Ray) every dependency first
    if config.executor == "slurm" and not all(step.done() for step in pending):
        raise CurateLaunched(
            f"curate: {len(pending)} datatrove steps submitted to Slurm (logs under {pending[0].logs.parent}); "
            f"run the same command again once they have finished to write the curated manifest"
        )


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


def _pass(name: str, input_dir: Path, output_dir: Path, steps: list[Any], tasks: int, logs: Path, gzip: bool,
          names: list[str], missing_ok: bool = False) -> Step:
    """Read ``names`` from ``input_dir``, apply ``steps``, write what is left under the same names."""
    from sharder.curate.shardio import TextShardReader, TextShardWriter

    output_dir.mkdir(parents=True, exist_ok=True)
    shards = [str(input_dir / n) for n in names]
    return Step(name, [TextShardReader(shards, missing_ok), *steps, TextShardWriter(str(output_dir), gzip)],
                tasks, logs, tasks)


def _dedup_steps(work: Path, config: Any, tasks: int, input_dir: Path, names: list[str], gzip: bool,
                 output_dir: Path, missing_ok: bool) -> list[Step]:
    """Exact then MinHash dedup of ``input_dir`` into ``output_dir`` (datatrove's steps).

    ``missing_ok``: the input is a filter step's output, where a shard whose every document was
    dropped does not exist (the filter may not have run yet when a cluster chain is built).
    """
    from datatrove.pipeline.dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
    )

    from sharder.curate.shardio import TextShardReader

    shards = [str(input_dir / n) for n in names]
    steps: list[Step] = []
    before: list[Any] = []
    if config.exact:
        exact = ExactDedupConfig(content_getter=_normalised)
        steps.append(Step("exact_sigs", [TextShardReader(shards, missing_ok), ExactDedupSignature(str(work / "exact_sigs"), exact)],
                          tasks, work / "logs" / "exact_sigs", tasks))
        steps.append(Step("exact_dups", [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), exact)], 1,
                          work / "logs" / "exact_dups"))
        before.append(ExactDedupFilter(str(work / "exact_dups"), exact))
    if config.minhash:
        minhash = minhash_config(config)
        steps.append(Step("mh_sigs", [TextShardReader(shards, missing_ok), *before, MinhashDedupSignature(str(work / "mh_sigs"), minhash)],
                          tasks, work / "logs" / "mh_sigs", tasks))
        steps.append(Step("mh_buckets", [MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=minhash)],
                          config.buckets, work / "logs" / "mh_buckets", tasks))
        steps.append(Step("mh_remove", [MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"), config=minhash)], 1,
                          work / "logs" / "mh_remove"))
        before.append(MinhashDedupFilter(str(work / "mh_remove")))
    steps.append(_pass("write", input_dir, output_dir, before, tasks, work / "logs" / "write", gzip, names, missing_ok))
    return steps


def minhash_config(config: Any) -> Any:
    """datatrove's MinhashConfig for the recipe's dedup settings.

    Shingles are hashed with sha1: datatrove 0.10's xxhash path passes ``str`` to xxhash, which
    xxhash 4 refuses ("Strings must be encoded before hashing").
    """
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    return MinhashConfig(n_grams=config.n_grams, num_buckets=config.buckets, hashes_per_bucket=config.hashes_per_bucket,
                         seed=config.seed, hash_config=HashConfig(precision=64, hash_fc="sha1"))


def check_curate(config: CurateConfig) -> None:
    """The settings that only datatrove or the reference model can judge (a filter's option names, the
    perplexity checkpoint and tokenizer on disk), checked without doing any work: orchestrate calls
    this when it plans, so a typo does not wait for the shard stage to finish."""
    from sharder.curate.perplexity import check_model
    from sharder.curate.quality import check_quality_options

    if config.perplexity is not None:
        check_model(config.perplexity)
    check_quality_options(config.quality)


def run_curate(input_dir: Path, output_dir: Path, config: CurateConfig, console: Console | None = None) -> dict[str, Any]:
    """Curate the shards listed in ``input_dir``'s manifest into ``output_dir``; resumable, deterministic.

    Returns the summary (documents in and out, removed by each step, seconds, throughput).
    """
    from sharder.curate.perplexity import PerplexityFilter, PerplexityScorer, load_scores, threshold
    from sharder.curate.quality import quality_steps
    from sharder.curate.shardio import TextShardReader

    console = console or Console(stderr=True)
    try:
        source = load_manifest(input_dir)
    except ManifestError as exc:
        raise ShardError(f"curate input: {exc}") from None
    if not source.complete:
        raise ShardError(f"curate input {input_dir}: the shard run is not complete; finish it first")
    check_curate(config)
    quality = quality_steps(config.quality)
    started = time.monotonic()
    names = [s.name for s in source.shards]
    gzip = any(n.endswith(".gz") for n in names)
    work = output_dir / WORK
    settings = config.model_dump(exclude={"executor", "executor_options"})  # where it runs changes no byte
    final_fp = _fp(CURATE_VERSION, source.fingerprint(), settings)
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
        # the threshold needs every score, so scoring runs (or is submitted) on its own first
        _run_steps([Step("scores", [TextShardReader([str(input_dir / n) for n in names]), PerplexityScorer(p, str(scores_dir))],
                         config.tasks, scores_dir / "logs", config.tasks)], config)
        limit = threshold(p, load_scores(scores_dir))
        counts["perplexity_threshold"] = round(limit, 3)
        filter_steps.append(PerplexityFilter(str(scores_dir), limit))
        filter_fp = _fp(filter_fp, score_fp, limit)
    current = input_dir
    steps: list[Step] = []
    if filter_steps:
        target = output_dir if config.dedup is None else work / f"filter-{filter_fp}"
        steps.append(_pass("filter", input_dir, target, filter_steps, config.tasks, work / f"filter-{filter_fp}-logs", gzip, names))
        current = target
    if config.dedup is not None:
        dedup_fp = _fp(filter_fp, config.dedup.model_dump(), config.tasks)
        steps += _dedup_steps(work / f"dedup-{dedup_fp}", config.dedup, config.tasks, current, names, gzip, output_dir,
                              missing_ok=current != input_dir)
    _run_steps(steps, config)
    if filter_steps:
        counts["after_filters"] = sum(e.lines for e in _entries(current, names, None))
    if not steps:  # nothing to do: copy the shards as they are
        for n in names:
            for path in (input_dir / n, sources_file(input_dir / n)):
                if path.exists():
                    shutil.copyfile(path, output_dir / path.name)
    labels = source_labels(source.source)
    entries = _entries(output_dir, names, labels)
    manifest = Manifest(
        source={"type": "curated", "from": str(input_dir), "input_fingerprint": source.fingerprint(),
                "curate": settings, "version": CURATE_VERSION, "labels": labels},
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
