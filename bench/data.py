"""Benchmark: the data recipe's mixer, dedup and quality filters against datatrove's own example pipelines.

    .venv/bin/python bench/data.py [--documents 3000] [--repeat 2] [--out-dir DIR]

Makes one corpus (cached in $TMPDIR/podtrain-bench/data-<N>): ``N`` prose-like documents built from
the Python standard library's docstrings and comments, plus planted duplicates (10% near copies with
1-5% of words replaced, 5% exact copies), written both as two JSONL files (the mixer's two sources
and datatrove's input) and, by the mixer run, as podtrain text shards (the curate input). Then, one
process and one task each (so the figures are per core):

- mixer: ``fineweb-sharder --data`` on a weighted [3, 1] recipe of the two files, against
  datatrove's ``JsonlReader -> JsonlWriter`` on the same files (datatrove has no mixer: reading and
  writing the same documents is the work both must do);
- dedup: podtrain's curate stage (MinHash alone, then exact + MinHash; the fineweb preset, 5-grams x 14 x 8)
  against datatrove's example ``minhash_deduplication.py`` (the 4 MinHash steps,
  JsonlReader/JsonlWriter), same config;
- filters: the curate stage with gopher_repetition, fineweb, gopher_quality and c4 against
  datatrove's ``fineweb.py`` filter block (same four filters) between JsonlReader and JsonlWriter.

Best of ``--repeat`` runs each, documents in per second of wall time. Then, for each MinHash setting
of ``SWEEP`` (the two presets and neighbours), the share of planted duplicates removed and of distinct
documents lost, next to the recall the banding formula predicts for a copy with 5% of its words
replaced. Prints two tables and writes bench/results/data.json.
"""

from __future__ import annotations

import os
import sys

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH]  # bench/tokenize.py shadows tokenize

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("USE_TORCH", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

QUALITY = {"gopher_repetition": {}, "fineweb": {}, "gopher_quality": {}, "c4": {}}
# (name, n_grams, buckets, hashes_per_bucket): the presets of sharder.recipe.MINHASH_PRESETS and neighbours
SWEEP = [("fineweb", 5, 14, 8), ("", 5, 20, 5), ("", 4, 20, 5), ("", 3, 14, 8), ("light_edits", 3, 20, 5),
         ("", 5, 25, 4)]


def predicted_recall(n_grams: int, buckets: int, rows: int, edited: float) -> float:
    """Chance that MinHash banding pairs a document with a copy whose ``edited`` share of words was
    replaced: a shingle survives with (1 - edited)^n, Jaccard J = u / (2 - u), caught 1 - (1 - J^r)^b."""
    unchanged = (1 - edited) ** n_grams
    jaccard = unchanged / (2 - unchanged)
    return 1 - (1 - jaccard**rows) ** buckets


def _prose() -> list[str]:
    """Sentences from docstrings and comments of the standard library (English prose, real words)."""
    sentences: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in re.findall(r'"""(.*?)"""', text, flags=re.S):
            sentences += [s.strip() + "." for s in re.split(r"\.\s", " ".join(block.split())) if len(s.split()) > 5]
    return sentences


def make_corpus(directory: Path, documents: int, seed: int = 0) -> tuple[list[Path], list[int]]:
    """Two JSONL files (3:1 of the documents) and the family of each line (planted copies share one)."""
    files = [directory / "a.jsonl", directory / "b.jsonl"]
    families_file = directory / "families.json"
    if families_file.exists():
        return files, json.loads(families_file.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sentences = _prose()
    originals = []
    for _ in range(documents):
        paragraphs = [" ".join(rng.choice(sentences) for _ in range(rng.randrange(3, 7))) for _ in range(rng.randrange(3, 6))]
        originals.append("\n".join(paragraphs))
    docs = [(i, d) for i, d in enumerate(originals)]
    for _ in range(documents // 10):
        family = rng.randrange(documents)
        words = originals[family].split(" ")
        for position in rng.sample(range(len(words)), max(1, round(len(words) * rng.uniform(0.01, 0.05)))):
            words[position] = rng.choice(sentences).split(" ")[0]
        docs.append((family, " ".join(words)))
    for _ in range(documents // 20):
        family = rng.randrange(documents)
        docs.append((family, originals[family]))
    rng.shuffle(docs)
    cut = len(docs) * 3 // 4
    for path, part in ((files[0], docs[:cut]), (files[1], docs[cut:])):
        path.write_text("".join(json.dumps({"text": t, "id": str(k)}) + "\n" for k, (_, t) in enumerate(part)))
    families_file.write_text(json.dumps([f for f, _ in docs]))
    return files, [f for f, _ in docs]


def _cpu() -> str:
    """The CPU model (the machine a figure belongs to), from /proc/cpuinfo where there is one."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _quiet() -> None:
    from loguru import logger

    logger.remove()


def _datatrove(pipeline: list, logs: Path, tasks: int = 1) -> None:
    """Run a baseline step; its task logs go to ``logs`` only, as the curate stage's do (fair timing)."""
    import contextlib

    from datatrove.executor.local import LocalPipelineExecutor

    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(logs)).run()


def run_mixer(files: list[Path], out: Path) -> int:
    from sharder.pipeline import ShardOptions, run_shard

    recipe = out.parent / "recipe.yaml"
    recipe.write_text(json.dumps({"data": {"sources": [{"type": "files", "path": str(f)} for f in files],
                                           "mix_strategy": "weighted", "source_weights": [3, 1],
                                           "stop": "all_exhausted"}}))
    result = run_shard(ShardOptions(data=recipe, output_dir=out, mode="prod", lines_per_shard=2000),
                       console=Console(file=io.StringIO()))
    return result.splits["train"].documents


def datatrove_copy(files: list[Path], out: Path) -> None:
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    _datatrove([JsonlReader(str(files[0].parent), glob_pattern="*.jsonl"), JsonlWriter(str(out / "out"))], out / "logs")


def run_curate_bench(shards: Path, out: Path, config: dict) -> dict:
    from sharder.curate.run import run_curate
    from sharder.recipe import CurateConfig

    return run_curate(shards, out, CurateConfig(**config), Console(file=io.StringIO()))


def datatrove_minhash(files: list[Path], out: Path) -> None:
    """datatrove's examples/minhash_deduplication.py, local executor, one task."""
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from sharder.curate.run import minhash_config
    from sharder.recipe import DedupConfig

    config = minhash_config(DedupConfig())
    reader = JsonlReader(str(files[0].parent), glob_pattern="*.jsonl")
    _datatrove([reader, MinhashDedupSignature(str(out / "sigs"), config=config)], out / "logs1")
    _datatrove([MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=config)], out / "logs2",
               tasks=config.num_buckets)
    _datatrove([MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=config)], out / "logs3")
    _datatrove([reader, MinhashDedupFilter(str(out / "remove")), JsonlWriter(str(out / "out"))], out / "logs4")


def datatrove_filters(files: list[Path], out: Path) -> None:
    """The filter block of datatrove's examples/fineweb.py (the same four filters)."""
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    _datatrove([JsonlReader(str(files[0].parent), glob_pattern="*.jsonl"), GopherRepetitionFilter(),
                FineWebQualityFilter(), GopherQualityFilter(), C4QualityFilter(), JsonlWriter(str(out / "out"))],
               out / "logs")


def _best(fn, repeat: int, scratch: Path) -> float:
    best = float("inf")
    for i in range(repeat):
        target = scratch / f"run{i}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        start = time.perf_counter()
        fn(target)
        best = min(best, time.perf_counter() - start)
        shutil.rmtree(target, ignore_errors=True)
    return best


def removed_planted(shards: Path, out: Path, config: dict, families: list[int], order: list[str]) -> tuple[float, float]:
    """(share of planted duplicates removed, share of distinct documents lost) for a dedup config."""
    from sharder.manifest import load_manifest
    from sharder.textshard import read_documents

    run_curate_bench(shards, out, {"dedup": config})
    family_of = {}
    for text, family in zip(order, families):
        family_of.setdefault(text, family)
    kept = [d for p in load_manifest(out).shard_paths(out) for d in read_documents(p)]
    survivors: dict[int, int] = {}
    for text in kept:
        survivors[family_of[text]] = survivors.get(family_of[text], 0) + 1
    distinct = set(families)
    planted = len(families) - len(distinct)
    return (planted - sum(n - 1 for n in survivors.values())) / planted, len(distinct - set(survivors)) / len(distinct)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    _quiet()
    load_before = [round(x, 2) for x in os.getloadavg()]
    base = Path(tempfile.gettempdir()) / "podtrain-bench" / f"data-{args.documents}"
    files, families = make_corpus(base, args.documents)
    scratch = Path(tempfile.mkdtemp(prefix="podtrain-bench-data-"))
    try:
        shards = scratch / "shards"
        documents = run_mixer(files, shards)  # also the curate input
        from sharder.manifest import load_manifest
        from sharder.textshard import read_documents

        order = [d for p in load_manifest(shards).shard_paths(shards) for d in read_documents(p)]
        text_of_line = [json.loads(line)["text"] for f in files for line in f.read_text().splitlines()]
        family_by_text: dict[str, int] = {}
        for text, family in zip(text_of_line, families):  # a.jsonl then b.jsonl, as make_corpus wrote them
            family_by_text.setdefault(text, family)
        shard_families = [family_by_text[t] for t in order]
        rows = [
            ("mixer: fineweb-sharder --data (weighted 3:1)", "datatrove JsonlReader -> JsonlWriter",
             _best(lambda t: run_mixer(files, t / "s"), args.repeat, scratch / "m"),
             _best(lambda t: datatrove_copy(files, t), args.repeat, scratch / "mb")),
            ("dedup: curate MinHash 5g 14x8", "datatrove minhash_deduplication example",
             _best(lambda t: run_curate_bench(shards, t / "c", {"dedup": {"exact": False}}), args.repeat, scratch / "d"),
             _best(lambda t: datatrove_minhash(files, t), args.repeat, scratch / "db")),
            ("dedup: curate exact + MinHash 5g 14x8", "datatrove minhash_deduplication example",
             _best(lambda t: run_curate_bench(shards, t / "c", {"dedup": {}}), args.repeat, scratch / "e"),
             _best(lambda t: datatrove_minhash(files, t), args.repeat, scratch / "db")),
            ("filters: curate gopher_rep+fineweb+gopher+c4", "datatrove fineweb.py filter block",
             _best(lambda t: run_curate_bench(shards, t / "c", {"quality": QUALITY}), args.repeat, scratch / "f"),
             _best(lambda t: datatrove_filters(files, t), args.repeat, scratch / "fb")),
        ]
        recall = [(name, n, b, r, *removed_planted(shards, scratch / f"r{n}-{b}-{r}",
                                                     {"exact": False, "n_grams": n, "buckets": b, "hashes_per_bucket": r},
                                                     shard_families, order))
                  for name, n, b, r in SWEEP]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = Table(title=f"data recipes: {documents:,} documents, one task, best of {args.repeat}")
    for col in ("step", "podtrain s", "podtrain docs/s", "baseline", "baseline s", "baseline docs/s", "vs baseline"):
        table.add_column(col)
    results = []
    for name, baseline, ours, theirs in rows:
        table.add_row(name, f"{ours:.2f}", f"{documents / ours:,.0f}", baseline, f"{theirs:.2f}",
                      f"{documents / theirs:,.0f}", f"{ours / theirs - 1:+.0%}")
        results.append({"step": name, "seconds": ours, "docs_per_s": documents / ours, "baseline": baseline,
                        "baseline_seconds": theirs, "baseline_docs_per_s": documents / theirs})
    console = Console(width=200)
    console.print(table)
    sweep = Table(title=f"MinHash settings on the planted duplicates (1-5% of words replaced), MinHash alone")
    for col in ("setting", "n-grams x buckets x rows", "threshold ~(1/b)^(1/r)", "predicted at 5% edits",
                "planted removed", "distinct lost"):
        sweep.add_column(col)
    for name, n, b, r, removed, lost in recall:
        sweep.add_row(name or "-", f"{n} x {b} x {r}", f"{(1 / b) ** (1 / r):.2f}", f"{predicted_recall(n, b, r, 0.05):.1%}",
                      f"{removed:.1%}", f"{lost:.2%}")
    console.print(sweep)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "data.json").write_text(json.dumps({
        "documents": documents, "repeat": args.repeat, "machine": platform.platform(), "cpu": _cpu(), "cores": os.cpu_count(),
        "load_average_before": load_before, "python": platform.python_version(),
        "results": results,
        "planted_duplicates": [{"preset": name or None, "n_grams": n, "buckets": b, "hashes_per_bucket": r,
                                "removed": removed, "distinct_lost": lost,
                                "predicted_at_5pct_edits": predicted_recall(n, b, r, 0.05)}
                               for name, n, b, r, removed, lost in recall],
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
