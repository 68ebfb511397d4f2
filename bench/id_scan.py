"""Benchmark: the trainer's background token-id scan (training/id_scan.py) on one core.

    .venv/bin/python bench/id_scan.py [--gb 1.0] [--repeat 3] [--out-dir DIR]

Writes one uint16 token shard of ``--gb`` GB in $TMPDIR/podtrain-bench (cached), reads it once so
it is in the page cache, then times, best of ``--repeat``, on one thread:

- scan: ``check_token_ids`` (a max per memory-mapped 16M-token chunk), what ``IdScan`` runs per shard;
- baseline read: ``readinto`` of the same file into one buffer (the bytes alone, no check);
- baseline max: ``ndarray.max`` of the same tokens already in memory (the check alone, no paging).

So the scan's cost is placed between the page cache's copy rate and numpy's reduction rate. Prints a
table and writes bench/results/id_scan.json; docs/performance.md quotes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow the
# standard library's tokenize (imported by inspect): drop it first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from training.token_shards import HEADER_SIZE, check_token_ids, write_token_shard  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50_257


def shard(gb: float) -> Path:
    path = Path(tempfile.gettempdir()) / "podtrain-bench" / f"id-scan-{gb:g}GB.tok"
    tokens = int(gb * 1e9) // 2
    if not path.exists() or path.stat().st_size != HEADER_SIZE + 2 * tokens:
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.random.default_rng(0).integers(0, VOCAB, size=tokens, dtype=np.uint16)
        write_token_shard(path, ids, VOCAB, VOCAB - 1)
    return path


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    path = shard(args.gb)
    size = path.stat().st_size
    buffer = bytearray(size)

    def read() -> None:
        with open(path, "rb", buffering=0) as fh:
            fh.readinto(buffer)

    read()  # into the page cache
    in_memory = np.frombuffer(buffer, dtype=np.uint16, offset=HEADER_SIZE)
    rows = {
        "scan (check_token_ids)": best(lambda: check_token_ids(path, VOCAB), args.repeat),
        "baseline read (readinto)": best(read, args.repeat),
        "baseline max (in memory)": best(lambda: in_memory.max(), args.repeat),
    }
    print(f"{'one core, ' + f'{size / 1e9:.2f} GB shard':<34} {'seconds':>8} {'GB/s':>7}")
    for name, seconds in rows.items():
        print(f"{name:<34} {seconds:>8.3f} {size / 1e9 / seconds:>7.2f}")
    result = {"bytes": size, "threads": 1, "cpu": platform.processor() or platform.machine(), "os_cpus": os.cpu_count(),
              "seconds": rows, "gb_per_s": {k: size / 1e9 / v for k, v in rows.items()}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "id_scan.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
