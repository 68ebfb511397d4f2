"""Benchmark: the encode stage against the nanoGPT-style tokenization of the same text shards.

    .venv/bin/python bench/tokenize.py [--megabytes 100] [--vocab-size 32768] [--workers 2] [--with-fallback]

Generates once (cached in $TMPDIR/podtrain-bench/tokenize-<MB>mb) a corpus of text shards: the
Python standard library's sources cut into page-sized documents (code, docstrings, comments),
and English-like prose from a word-level Markov chain fitted on those docstrings and comments,
shuffled together. Then, in this process:

- trains the tokenizer on it (``prepare_tokenizer``, byte-level BPE) and reports the time;
- baseline, nanoGPT's ``data/openwebtext/prepare.py`` shape: the documents into a ``datasets``
  Dataset, ``.map`` with ``num_proc=2`` calling ``tokenizer.encode`` per document and appending
  the end-of-text id, then ``np.concatenate`` of 1024 contiguous slices into one uint16 memmap;
- the same baseline with the tiktoken encoder our stage uses, to separate what comes from the
  engine and what from the pipeline;
- ours: ``encode_shards`` (auto engine, i.e. tiktoken verified against tokenizers) and, with
  ``--with-fallback``, ``engine="tokenizers"`` (the path taken when tiktoken cannot match);
- checks that every run produced the same token stream, token for token.

Prints a table and writes bench/results/tokenize.json, with the 1-minute load average before each
run: on a shared machine other work slows whichever run it overlaps, so compare runs taken at
similar load.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's name shadows the standard library's `tokenize` (which linecache, inspect and others
# import): take its directory off the import path before anything else is imported.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import sysconfig
import tempfile
import time
from collections import defaultdict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # explicit: no fork warning from datasets.map

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from orchestrator.tokenizer.encode import encode_shards, load_token_manifest  # noqa: E402
from orchestrator.tokenizer.tiktoken_bpe import build_encoding  # noqa: E402
from orchestrator.tokenizer.bpe import TokenizerBundle, prepare_tokenizer  # noqa: E402
from sharder.manifest import Manifest, ShardEntry, load_manifest  # noqa: E402
from sharder.textshard import escape, open_text, read_documents  # noqa: E402
from training.token_shards import open_tokens  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "tokenize.json"
CORPUS_VERSION = 1
SHARDS = 16
_DOCSTRING = re.compile(r'"""(.*?)"""', re.DOTALL)
_COMMENT = re.compile(r"^\s*#\s?(.+)$", re.MULTILINE)


# ---------------------------------------------------------------- corpus

def _stdlib_sources() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def _markov_prose(sources: list[str], rng: random.Random):
    """An endless generator of prose documents from an order-2 word chain over docstrings and comments."""
    chain: dict[tuple[str, str], list[str]] = defaultdict(list)
    for text in sources:
        prose = " ".join(_DOCSTRING.findall(text)) + " " + " ".join(_COMMENT.findall(text))
        words = prose.split()
        for a, b, c in zip(words, words[1:], words[2:]):
            chain[a, b].append(c)
    starts = [k for k in chain if k[0][:1].isupper()]
    while True:
        paragraphs = []
        for _ in range(max(1, int(rng.lognormvariate(1.2, 0.6)))):
            a, b = rng.choice(starts)
            words = [a, b]
            for _ in range(int(rng.lognormvariate(4.3, 0.5))):
                nexts = chain.get((a, b))
                if not nexts:
                    a, b = rng.choice(starts)
                    words[-1] += "."
                    words += [a, b]
                    continue
                a, b = b, rng.choice(nexts)
                words.append(b)
            paragraphs.append(" ".join(words))
        yield "\n\n".join(paragraphs)


def make_corpus(directory: Path, megabytes: int, console: Console) -> float:
    """Write the text shards once; returns the generation time (0 when cached)."""
    target = megabytes * 1_000_000
    settings = {"generator": CORPUS_VERSION, "megabytes": megabytes, "shards": SHARDS}
    try:
        if load_manifest(directory).settings == settings:
            return 0.0
    except ValueError:
        pass
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    start = time.perf_counter()
    rng = random.Random(1234)
    sources = _stdlib_sources()
    docs: list[str] = []
    size = 0
    for text in sources:  # code: every source file once, cut at line ends into ~page-sized documents
        lines = text.splitlines(keepends=True)
        while lines and size < target * 0.35:
            take = max(5, int(rng.lognormvariate(3.7, 0.8)))
            doc = "".join(lines[:take])
            lines = lines[take:]
            docs.append(doc)
            size += len(doc.encode())
    prose = _markov_prose(sources, rng)
    while size < target:
        doc = next(prose)
        docs.append(doc)
        size += len(doc.encode())
    rng.shuffle(docs)
    entries = []
    per = -(-len(docs) // SHARDS)
    for i in range(SHARDS):
        name = f"shard_{i:05d}.txt"
        part = docs[i * per : (i + 1) * per]
        with open_text(directory / name, "wt") as fh:
            fh.write("".join(escape(d) + "\n" for d in part))
        data = (directory / name).read_bytes()
        entries.append(ShardEntry(name, len(part), len(data), hashlib.sha256(data).hexdigest()))
    Manifest(source={"kind": "bench"}, mode="local", split="train", settings=settings, shards=entries,
             complete=True).save(directory)
    seconds = time.perf_counter() - start
    console.print(f"corpus: {len(docs):,} documents, {size / 1e6:,.1f} MB in {SHARDS} shards ({seconds:,.1f} s)")
    return seconds


# ---------------------------------------------------------------- baseline (nanoGPT prepare.py)

def _documents(paths: list[str]):
    for path in paths:
        for doc in read_documents(path):
            yield {"text": doc}


def load_dataset_from_shards(text_dir: Path, cache: Path):
    from datasets import Dataset

    paths = [str(p) for p in load_manifest(text_dir).shard_paths(text_dir)]
    return Dataset.from_generator(_documents, gen_kwargs={"paths": paths}, cache_dir=str(cache))


class _PerDocument:
    """nanoGPT's ``process``: ids of one document plus the end-of-text id (picklable for num_proc)."""

    def __init__(self, bundle_dir: str, engine: str) -> None:
        self.bundle_dir, self.engine, self._encode = bundle_dir, engine, None

    def __getstate__(self):
        return {"bundle_dir": self.bundle_dir, "engine": self.engine, "_encode": None}

    def __call__(self, example):
        if self._encode is None:
            bundle = TokenizerBundle.load(self.bundle_dir)
            if self.engine == "tiktoken":
                self._encode = build_encoding(bundle.tokenizer_json.read_text(encoding="utf-8")).encode_ordinary
            else:
                tok = bundle.load_tokenizer()
                self._encode = lambda text: tok.encode(text).ids
            self.eot = bundle.eot_id
        ids = self._encode(example["text"])
        ids.append(self.eot)
        return {"ids": ids, "len": len(ids)}


def nanogpt_baseline(dataset, bundle: TokenizerBundle, engine: str, out: Path, num_proc: int) -> dict:
    start = time.perf_counter()
    tokenized = dataset.map(_PerDocument(str(bundle.directory), engine), remove_columns=["text"], num_proc=num_proc,
                            load_from_cache_file=False, new_fingerprint=f"bench-{engine}-{time.time_ns()}",
                            desc=f"baseline ({engine})")
    mapped = time.perf_counter()
    arr_len = int(np.sum(tokenized["len"], dtype=np.uint64))
    arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(arr_len,))
    total_batches = min(1024, len(tokenized))
    idx = 0
    for batch_idx in range(total_batches):
        batch = tokenized.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx : idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    end = time.perf_counter()
    return {"seconds": end - start, "map_s": mapped - start, "concat_s": end - mapped, "tokens": arr_len}


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--workers", type=int, default=2, help="our workers and the baseline's num_proc")
    parser.add_argument("--with-fallback", action="store_true", help="also time our tokenizers fallback engine")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "podtrain-bench")
    args = parser.parse_args()
    console = Console()
    work = args.workdir / f"tokenize-{args.megabytes}mb"
    text_dir = work / "text"
    generate_s = make_corpus(text_dir, args.megabytes, console)
    manifest = load_manifest(text_dir)

    shutil.rmtree(work / "bundle", ignore_errors=True)
    start = time.perf_counter()
    bundle, _ = prepare_tokenizer([text_dir], work / "bundle", args.vocab_size, console=console)
    train_s = time.perf_counter() - start
    meta = json.loads((bundle.directory / "meta.json").read_text())

    cache = work / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    dataset = load_dataset_from_shards(text_dir, cache)
    load_s = time.perf_counter() - start

    runs: list[dict] = []
    streams: dict[str, np.ndarray] = {}
    for engine in ("tokenizers", "tiktoken"):
        name = f"baseline: datasets.map(num_proc={args.workers}), {engine} per doc"
        out = work / f"baseline-{engine}.bin"
        load_before = os.getloadavg()[0]
        result = nanogpt_baseline(dataset, bundle, engine, out, args.workers)
        result["seconds"] += load_s  # reading the shards into the Dataset is part of its pipeline
        result["load_s"] = load_s
        runs.append({"name": name, "loadavg_before": load_before} | result)
        streams[name] = np.memmap(out, dtype=np.uint16, mode="r")
        console.print(f"{name}: {result['seconds']:,.1f} s")
    for engine in ("auto", "tokenizers") if args.with_fallback else ("auto",):
        out = work / f"tokens-{engine}"
        shutil.rmtree(out, ignore_errors=True)
        load_before = os.getloadavg()[0]
        result = encode_shards(text_dir, out, bundle, workers=args.workers, engine=engine, console=console)
        name = f"ours: encode_shards(workers={args.workers}), {result.engine}"
        runs.append({"name": name, "loadavg_before": load_before, "seconds": result.seconds, "tokens": result.tokens})
        text_mb = result.bytes_in / 1e6
        shards = [open_tokens(out / s["name"]) for s in load_token_manifest(out)["shards"]]
        streams[name] = np.concatenate(shards)

    reference = next(iter(streams.values()))
    identical = all(len(s) == len(reference) and np.array_equal(s, reference) for s in streams.values())
    baseline_s = runs[0]["seconds"]
    for run in runs:
        run["mb_per_s"] = text_mb / run["seconds"]
        run["tokens_per_s"] = run["tokens"] / run["seconds"]
        run["speedup"] = baseline_s / run["seconds"]

    table = Table(title=f"tokenize {text_mb:,.1f} MB, {manifest.total_lines:,} documents, vocab {bundle.vocab_size}")
    for col in ("run", "seconds", "MB/s", "M tokens/s", "speedup"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for run in runs:
        table.add_row(run["name"], f"{run['seconds']:.1f}", f"{run['mb_per_s']:.2f}",
                      f"{run['tokens_per_s'] / 1e6:.2f}", f"{run['speedup']:.2f}x")
    console.print(table)
    console.print(f"tokenizer training: {train_s:,.1f} s on {meta['training']['bytes'] / 1e6:,.1f} MB; "
                  f"identical token streams: {identical}")

    import datasets
    import tiktoken
    import tokenizers

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "bench": "tokenize",
        "command": "python bench/tokenize.py " + " ".join(sys.argv[1:]),
        "corpus": {"text_mb": text_mb, "documents": manifest.total_lines, "shards": len(manifest.shards),
                   "generate_s": generate_s},
        "tokenizer": {"vocab_size": bundle.vocab_size, "train_s": train_s, "train_mb": meta["training"]["bytes"] / 1e6},
        "baseline": runs[0]["name"],
        "runs": runs,
        "identical_token_streams": identical,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__, "datasets": datasets.__version__},
    }, indent=2) + "\n")
    console.print(f"wrote {RESULTS.relative_to(ROOT)}")
    if not identical:
        sys.exit("token streams differ between runs")


if __name__ == "__main__":
    main()
