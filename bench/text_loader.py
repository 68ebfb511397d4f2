"""Benchmark: the trainer's text loader (tokenizing on the fly) against the trainer's demand and two baselines.

    .venv/bin/python bench/text_loader.py [--megabytes 20] [--tokens 3000000] [--tokenizer PATH] [--seq-len 2048]

Makes once (cached in $TMPDIR/podtrain-bench/text-<MB>mb) a folder of 8 parquet shards: the Python
standard library's sources, one file per row, repeated up to the size asked; and, without
``--tokenizer``, a GPT-2-style byte-level BPE (32,768 ids, ``<|endoftext|>``) trained on a 4 MB
sample of it. Then, in this process, each reader delivers ``--tokens`` tokens as windows of
``seq_len + 1`` (batch 8), documents separated by the end-of-text id, and the tokens per second of
wall time are compared with:

- demand: what one H100 consumes training runpod_1b at 50% MFU (989 bf16 TFLOP/s x 0.5 /
  ``flops_per_token``, training/model.py), about 80k tokens/s;
- baseline ``per-row encode``: the loader one writes first, ``tokenizer.encode`` row by row in the
  training thread, then packing (what seed 003's loader would do without a worker);
- baseline ``datasets .map``: ``load_dataset("parquet", streaming=True).map(batched=True)`` with
  the fast tokenizer's ``encode_batch``, iterated in the training thread (the usual Hugging Face recipe);
- ours: ``TextStream`` (training/text_data.py), ``encode_batch`` on a background thread, under the
  trainer's batch loader and prefetch thread (``num_workers: 4``), exactly as ``train`` reads it.

Each reader is measured twice: alone (as fast as it can deliver), and feeding a simulated trainer
that sleeps one micro-step of the 1B model at demand after each batch (a GPU step leaves the CPU and
the GIL free): there, a reader working in the training thread adds its time to every step, while a
background one overlaps it, and the share of wall time spent waiting for data is what starves the
GPU. Every reader must produce the same windows as ours in file order (checked, token for token).
Prints a table and writes bench/results/text_loader.json, with the 1-minute load average before each
run (on a shared machine other work slows whichever run it overlaps).
"""

from __future__ import annotations

import os
import sys

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH]  # bench/tokenize.py shadows tokenize

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from training.config import load_config  # noqa: E402
from training.data import BatchLoader, Prefetcher, resolve_inputs  # noqa: E402
from training.model import build_meta_model, count_parameters, flops_per_token  # noqa: E402
from training.text_data import TextStream, inspect_file  # noqa: E402
from training.text_tokenizer import TextTokenizer, load_text_tokenizer  # noqa: E402

H100_BF16_FLOPS = 989e12
TARGET_MFU = 0.5
BATCH = 8
VOCAB = 32768


def corpus(directory: Path, megabytes: int) -> Path:
    """8 parquet shards of stdlib sources, one file per row, ``megabytes`` of text in all (cached)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = directory / "corpus" / ".done"
    if done.exists():
        return done.parent
    done.parent.mkdir(parents=True, exist_ok=True)
    sources = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))]
    rows, size, i = [], 0, 0
    while size < megabytes * 1_000_000:
        text = sources[i % len(sources)]
        rows.append(text)
        size += len(text.encode())
        i += 1
    for k, part in enumerate(np.array_split(np.arange(len(rows)), 8)):
        pq.write_table(pa.table({"text": [rows[j] for j in part]}), done.parent / f"shard_{k:05d}.parquet")
    done.touch()
    return done.parent


def trained_tokenizer(directory: Path, data: Path) -> Path:
    """A GPT-2-style byte-level BPE trained on a 4 MB sample of the corpus (cached)."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = directory / f"gpt2-style-{VOCAB}.json"
    if path.exists():
        return path
    sample, size = [], 0
    for text in pq.read_table(sorted(data.glob("*.parquet"))[0]).column("text").to_pylist():
        sample.append(text)
        size += len(text)
        if size > 4_000_000:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def _rows(files: list[Path]) -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=["text"]):
            yield from batch.column(0).to_pylist()


def _batches(docs: Iterator[list[int]], seq_len: int) -> Iterator[np.ndarray]:
    """(BATCH, seq_len + 1) windows overlapping by one, from documents' ids (each ending in end-of-text)."""
    buf: list[int] = []
    while True:
        while len(buf) < BATCH * seq_len + 1:
            buf.extend(next(docs))
        flat = np.asarray(buf[: BATCH * seq_len + 1], dtype=np.int64)
        yield flat[np.arange(BATCH)[:, None] * seq_len + np.arange(seq_len + 1)]
        del buf[: BATCH * seq_len]


def per_row(tok: TextTokenizer, files: list[Path], seq_len: int) -> Iterator[np.ndarray]:
    encode = tok.tokenizer.encode
    return _batches((encode(t, add_special_tokens=False).ids + [tok.eot_id] for t in _rows(files) if t), seq_len)


def datasets_map(tok: TextTokenizer, files: list[Path], seq_len: int) -> Iterator[np.ndarray]:
    from datasets import load_dataset

    stream = load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
    mapped = stream.map(lambda b: {"ids": [ids + [tok.eot_id] for ids in tok.encode_batch([t for t in b["text"] if t])]},
                        batched=True, batch_size=256, remove_columns=["text"])
    return _batches((row["ids"] for row in mapped), seq_len)


def ours(tok: TextTokenizer, files: list[Path], seq_len: int) -> Iterator[np.ndarray]:
    """The trainer's path: TextStream under the batch loader and its prefetch thread (num_workers=4)."""
    stream = TextStream([inspect_file(p, "train_data") for p in files], tok, 0, tok.vocab_size, shuffle=False)
    batches = Prefetcher(BatchLoader(stream, BATCH, seq_len), depth=4)
    try:
        while True:
            x, y = batches.next_batch()
            yield torch.cat([x, y[:, -1:]], dim=1).numpy()  # the (B, T + 1) windows back
    finally:
        batches.close()


def consume(batches: Iterator[np.ndarray], count: int, step_s: float) -> tuple[list[np.ndarray], float, float]:
    """Take ``count`` batches, sleeping ``step_s`` after each (a GPU step: the GIL is free meanwhile);
    returns (the batches, wall seconds, seconds spent waiting for batches)."""
    out, waited = [], 0.0
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        out.append(next(batches))
        waited += time.perf_counter() - t0
        if step_s:
            time.sleep(step_s)
    return out, time.perf_counter() - start, waited


def demand() -> float:
    cfg = load_config(ROOT / "configs" / "runpod_1b.yaml")
    n = count_parameters(build_meta_model(cfg.model))
    return TARGET_MFU * H100_BF16_FLOPS / flops_per_token(cfg.model, cfg.seq_len, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=3_000_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokenizer", help="tokenizer_path to use (default: a GPT-2-style BPE trained on the corpus)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    cache = Path(tempfile.gettempdir()) / "podtrain-bench" / f"text-{args.megabytes}mb"
    data = corpus(cache, args.megabytes)
    tok = load_text_tokenizer(args.tokenizer or str(trained_tokenizer(cache, data)))
    _, files = resolve_inputs(str(data))
    need = demand()
    count = -(-args.tokens // (BATCH * args.seq_len))
    step_s = BATCH * args.seq_len / need  # one micro-step of the 1B model on an H100 at 50% MFU
    readers: list[tuple[str, Callable[..., Iterator[np.ndarray]]]] = [
        ("baseline: per-row encode", per_row), ("baseline: datasets .map", datasets_map), ("ours: TextStream", ours)]
    results, reference = [], None
    for name, reader in readers:
        load = round(os.getloadavg()[0], 2)
        batches, seconds, _ = consume(reader(tok, files, args.seq_len), count, 0.0)
        load_sim = round(os.getloadavg()[0], 2)
        _, sim_seconds, waited = consume(reader(tok, files, args.seq_len), count, step_s)
        windows = np.concatenate(batches)
        reference = windows if reference is None else reference
        tokens = count * BATCH * args.seq_len
        results.append({"reader": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                        "x_demand": tokens / seconds / need, "same_windows": bool(np.array_equal(windows, reference)),
                        "at_demand_tokens_per_s": tokens / sim_seconds, "at_demand_wait_share": waited / sim_seconds,
                        "load_average_before": [load, load_sim]})
    table = Table(title=f"text loader: {count * BATCH * args.seq_len:,} tokens as {count} batches of {BATCH} x "
                        f"({args.seq_len}+1), {os.cpu_count()} cores; demand {need:,.0f} tokens/s (runpod_1b, one H100 at 50% MFU)")
    for col in ("reader", "alone: tokens/s", "x demand", "with a simulated step: tokens/s", "time waiting for data",
                "same windows", "load before"):
        table.add_column(col)
    for r in results:
        table.add_row(r["reader"], f"{r['tokens_per_s']:,.0f}", f"{r['x_demand']:.2f}", f"{r['at_demand_tokens_per_s']:,.0f}",
                      f"{r['at_demand_wait_share']:.0%}", str(r["same_windows"]), str(r["load_average_before"]))
    Console().print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "text_loader.json").write_text(json.dumps({
        "megabytes": args.megabytes, "seq_len": args.seq_len, "batch": BATCH, "tokenizer": tok.source, "vocab_size": tok.vocab_size,
        "demand_tokens_per_s": need, "simulated_step_s": step_s, "cpus": os.cpu_count(), "python": platform.python_version(),
        "results": results,
    }, indent=2) + "\n")
    if not all(r["same_windows"] for r in results):
        sys.exit("readers disagree on the windows")


if __name__ == "__main__":
    main()
