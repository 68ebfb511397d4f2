"""Benchmark: an FSDP save on 2 ranks (gloo, CPU), gathered to rank 0 (the baseline) against sharded DCP async.

    .venv/bin/python bench/checkpoint.py [--d-model 1024] [--layers 16] [--vocab 32000] [--ffn 2816]
                                         [--out bench/results/checkpoint.json]

The default model has 238M parameters (tied embedding): 0.95 GB of float32 weights, 3.8 GB with
AdamW's two moments. Each mode runs under torchrun with 2 ranks, built and sharded as the trainer
builds it (training/parallelize.py), one forward/backward and AdamW step so the optimizer has its
state, then one save through the trainer's own ``Checkpointer``:

- ``gathered`` (baseline, the format before sharding): every rank waits while the full weights and
  optimizer state are gathered to rank 0's CPU; rank 0 writes the three files on a thread.
- ``sharded``: each rank copies its own shard to CPU (staging) and DCP writes it on a thread.

Reported per mode and rank: the **stall** (seconds ``save()`` blocks the training loop), the seconds
until the checkpoint is whole on disk, and the peak RSS during the save (VmHWM, reset through
/proc/self/clear_refs just before it) above the RSS before it, and in total. Prints a table and
writes the JSON.
"""

from __future__ import annotations

import os
import sys

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH]  # bench/tokenize.py shadows tokenize

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINE = "gathered"
MODES = (BASELINE, "sharded")


def vm_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (the peak since the last reset) of this process, in MB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def worker(mode: str, config_path: str) -> None:
    """One rank under torchrun: build, one step, one save; writes ``<mode>-rank<N>.result.json`` beside the config."""
    import torch

    from training import checkpoint as ckpt
    from training.checkpointer import Checkpointer
    from training.config import validate_config
    from training.distributed import setup
    from training.optim import build_optimizer
    from training.parallelize import build_model

    cfg = validate_config(json.loads(Path(config_path).read_text()))
    dist = setup(cfg.distributed, "cpu")
    _, net = build_model(cfg, dist, None)
    optimizer = build_optimizer(net, cfg.optimizer, "cpu")
    x = torch.randint(0, cfg.model.vocab_size, (1, cfg.seq_len))
    net(x, x)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    checkpoints = Checkpointer(cfg.checkpoint_dir, dist, cfg.to_plain(), 2, cfg.model.tie_embeddings, print,
                               sharded=mode == "sharded")
    state = {"scheduler": {}, "scaler": {}, "loader": {"epoch": 0, "index": 0, "offset": 0}, "tokens_seen": 0,
             "best_val_loss": 1.0, "world_size": dist.world_size}
    dist.slow_barrier()
    Path("/proc/self/clear_refs").write_text("5")
    before = vm_mb("VmRSS")
    t0 = time.perf_counter()
    checkpoints.save([ckpt.step_tag(1)], 1, net, optimizer, state, ckpt.rng_state(dist.device))
    stall = time.perf_counter() - t0
    checkpoints.wait()
    whole = time.perf_counter() - t0
    report = {"mode": mode, "rank": dist.rank, "stall_s": stall, "whole_s": whole, "rss_before_mb": before,
              "peak_rss_mb": vm_mb("VmHWM"), "save_extra_mb": vm_mb("VmHWM") - before}
    # a file per rank: two ranks printing to one stdout can share a line
    Path(config_path).with_name(f"{mode}-rank{dist.rank}.result.json").write_text(json.dumps(report))
    dist.shutdown()


def run_mode(mode: str, args, scratch: Path) -> list[dict]:
    cfg = {"train_data": "unused", "seq_len": 16, "batch_size": 1, "checkpoint_dir": str(scratch / mode), "device": "cpu",
           "model": {"vocab_size": args.vocab, "d_model": args.d_model, "num_layers": args.layers, "max_seq_len": 16,
                     "attention": {"n_heads": args.d_model // 64}, "ffn": {"hidden_size": args.ffn}},
           "distributed": {"strategy": "fsdp", "timeout_s": 600}}
    path = scratch / f"{mode}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", mode, str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"bench/checkpoint.py: {mode} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    rows = [json.loads((scratch / f"{mode}-rank{rank}.result.json").read_text()) for rank in (0, 1)]
    size = sum(f.stat().st_size for f in (scratch / mode).rglob("*") if f.is_file())
    for r in rows:
        r["bytes_on_disk"] = size
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "checkpoint.json")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from rich.console import Console
    from rich.table import Table

    from training.config import ModelConfig
    from training.model import build_meta_model, count_parameters

    params = count_parameters(build_meta_model(ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                                                           max_seq_len=16, attention={"n_heads": args.d_model // 64},
                                                           ffn={"hidden_size": args.ffn})))
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as scratch:
        rows = [r for mode in MODES for r in run_mode(mode, args, Path(scratch))]
    table = Table(title=f"FSDP save, {params / 1e6:.0f}M parameters, 2 ranks (gloo, CPU); baseline: {BASELINE}")
    for col in ("mode", "rank", "stall s", "whole on disk s", "RSS before MB", "peak RSS MB", "save adds MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["mode"], str(r["rank"]), f"{r['stall_s']:.2f}", f"{r['whole_s']:.2f}", f"{r['rss_before_mb']:,.0f}",
                      f"{r['peak_rss_mb']:,.0f}", f"{r['save_extra_mb']:,.0f}")
    Console().print(table)
    rank0 = {r["mode"]: r for r in rows if r["rank"] == 0}
    summary = {"stall_ratio": rank0["sharded"]["stall_s"] / rank0[BASELINE]["stall_s"],
               "rank0_save_extra_ratio": rank0["sharded"]["save_extra_mb"] / max(1.0, rank0[BASELINE]["save_extra_mb"])}
    print(f"sharded vs {BASELINE} on rank 0: stall x{summary['stall_ratio']:.2f}, memory added by the save "
          f"x{summary['rank0_save_extra_ratio']:.2f}")
    import torch

    result = {"device": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "parameters": params, "baseline": BASELINE, "rows": rows, "summary": summary,
              "args": {k: v for k, v in vars(args).items() if k not in ("out", "worker")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
