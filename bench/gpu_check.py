"""The GPU check: the CUDA tests, runpod_1b and runpod_2b for a few dozen steps, one save and resume.

    python bench/gpu_check.py                      # on one H100/H200: under 8 minutes
    python bench/gpu_check.py --tiny --device cpu  # the same code path on a CPU, tiny model (seconds)

1. ``pytest -m gpu tests/gpu`` (CUDA only).
2. For each config: ``training.trainer.train`` itself, at the config's micro-batch, seq_len, dtype and
   compile setting, on synthetic token shards, ``--steps`` steps with ``--accum`` accumulation (the
   configs' 16 and 64 would take minutes per step). Tokens/s and MFU are the median of the trainer's
   own log windows after the first (which holds compilation); peak memory is
   ``torch.cuda.max_memory_allocated`` of the run, against ``training.memory_plan.plan`` for the
   same settings (the named baseline: the issue asks for within 10%; MFU target: 50% for runpod_1b).
3. The first config's run ends with the trainer's blocking ``final`` save, then a second ``train``
   call resumes from it (``--resume auto``, already at its last step, so it trains nothing and saves
   ``final`` once more). Seconds to save: from the trainer's last step line to its summary table;
   seconds to resume: from the ``train`` call to its "resumed from" line (building the model
   included). Both are read from timestamps of the trainer's own console lines.

Prints a table and writes bench/results/gpu_check.json (``--out``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow the
# standard library's tokenize (imported by inspect, which torch imports): drop it first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import gc
import io
import json
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from training.config import TrainConfig, load_config
from training.distributed import resolve_device
from training.memory_plan import plan
from training.metrics import device_peak_flops
from training.presets import PROJECT_ROOT
from training.token_shards import write_token_shard
from training.trainer import train

RESULTS = PROJECT_ROOT / "bench" / "results" / "gpu_check.json"
# --tiny: a ~0.1M-parameter model of the same architecture, for checking this script on a CPU.
TINY = {"seq_len": 64, "batch_size": 4, "compile_model": False,
        "model": {"vocab_size": 512, "d_model": 64, "num_layers": 2, "max_seq_len": 64, "attention": {"n_heads": 4},
                  "ffn": {"hidden_size": 128}}}


class StampedLines(io.TextIOBase):
    """A console file that keeps (monotonic time, line) for every line the trainer prints."""

    def __init__(self, echo: bool) -> None:
        self.lines: list[tuple[float, str]] = []
        self.echo = echo

    def write(self, text: str) -> int:
        now = time.monotonic()
        self.lines.extend((now, line) for line in text.splitlines() if line.strip())
        if self.echo:
            sys.stdout.write(text)
        return len(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def first(self, predicate) -> float | None:
        return next((t for t, line in self.lines if predicate(line)), None)

    def last(self, predicate) -> float | None:
        return next((t for t, line in reversed(self.lines) if predicate(line)), None)


def run_gpu_tests(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return {"returncode": proc.returncode, "seconds": time.monotonic() - t0, "summary": tail}


def run_config(name: str, args: argparse.Namespace, work: Path, device: torch.device) -> tuple[dict[str, Any], TrainConfig]:
    """Train ``name`` for ``args.steps`` steps through the real trainer; returns its row and config."""
    base = load_config(PROJECT_ROOT / "configs" / f"{name}.yaml")
    raw = base.model_dump(exclude_unset=True)
    if args.tiny:
        raw = {**raw, **TINY}
    overrides = {"device": args.device, "num_steps": args.steps, "gradient_accumulation_steps": args.accum,
                 "log_every": args.log_every, "eval_every": 10**9, "save_every": 10**9, "save_every_minutes": None,
                 "val_data": None, "checkpoint_dir": str(work / name / "ckpt"), "tensorboard_dir": str(work / name / "tb"),
                 "distributed": {"strategy": "none"}}
    cfg = TrainConfig.model_validate({**raw, **overrides, "train_data": str(work / name / "train")})
    vocab = cfg.model.vocab_size
    tokens = (args.steps + 2) * args.accum * cfg.batch_size * (cfg.seq_len + 1) + 1
    write_token_shard(work / name / "train" / "shard_00000.tok", np.random.default_rng(0).integers(0, vocab - 1, tokens),
                      vocab, vocab - 1)
    planned = plan(cfg, 1, "none")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = StampedLines(echo=not args.quiet)
    t0 = time.monotonic()
    result = train(cfg, console=Console(file=stamps, width=160, highlight=False))
    seconds = time.monotonic() - t0
    if result.exit_code != 0 or result.step != args.steps:
        raise SystemExit(f"gpu_check: {name}: the trainer stopped at step {result.step} with exit code {result.exit_code}")
    rows = [json.loads(line) for line in (Path(cfg.checkpoint_dir) / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "tokens_per_s" in r][1:]  # the first window holds compilation
    mfus = [r["mfu"] for r in windows if r.get("mfu") is not None]
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else rows[-1]["peak_mem_gb"]
    last_step = stamps.last(lambda line: line.startswith(f"step {args.steps}/"))
    summary = stamps.first(lambda line: "training summary" in line)
    row = {"config": name, "params": planned.params, "micro_batch": cfg.batch_size, "seq_len": cfg.seq_len,
           "accum": cfg.gradient_accumulation_steps, "steps": args.steps, "compile": cfg.compile_model,
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows) if windows else None,
           "mfu": statistics.median(mfus) if mfus else None, "peak_mem_gb": peak_gb,
           "planned_gb": planned.peak_bytes / 1e9, "peak_source": "cuda.max_memory_allocated" if device.type == "cuda" else "process RSS",
           "peak_vs_plan": peak_gb / (planned.peak_bytes / 1e9) if device.type == "cuda" else None,
           "seconds": seconds, "save_s": summary - last_step if summary and last_step else None}
    return row, cfg


def resume(cfg: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    stamps = StampedLines(echo=not args.quiet)
    t0 = time.monotonic()
    result = train(cfg, resume="auto", console=Console(file=stamps, width=160, highlight=False))
    resumed = stamps.first(lambda line: line.startswith("resumed from"))
    if resumed is None or result.step != cfg.num_steps:
        raise SystemExit(f"gpu_check: resume of {cfg.checkpoint_dir} did not resume (step {result.step})")
    return {"resume_s": resumed - t0, "resumed_step": result.step, "seconds": time.monotonic() - t0}


def release(device: torch.device) -> None:
    """Free one config's model, optimizer and compiled graphs before the next is measured."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["runpod_1b", "runpod_2b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accum", type=int, default=2, help="gradient accumulation (the configs' own would take minutes per step)")
    parser.add_argument("--log-every", type=int, default=10, help="steps per throughput window")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture: check this script on a CPU")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu tests/gpu first")
    parser.add_argument("--workdir", help="where shards and checkpoints go (default: a temporary directory, removed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quiet", action="store_true", help="do not echo the trainer's lines")
    args = parser.parse_args()
    device = resolve_device(args.device, 0)
    console = Console(highlight=False, width=160)
    started = time.monotonic()
    report: dict[str, Any] = {"bench": "gpu_check", "command": " ".join(["python bench/gpu_check.py", *sys.argv[1:]]),
                              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                              "peak_flops": device_peak_flops(device), "torch": torch.__version__, "tiny": args.tiny}
    report["gpu_tests"] = {"skipped": "--skip-tests"} if args.skip_tests else run_gpu_tests(device)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        runs, first_cfg = [], None
        for name in args.configs:
            row, cfg = run_config(name, args, Path(tmp), device)
            runs.append(row)
            if first_cfg is None:
                first_cfg = cfg
                release(device)
                report["checkpoint"] = {"config": name, "save_s": row["save_s"], **resume(cfg, args)}
            release(device)
        report["runs"] = runs
    report["total_seconds"] = time.monotonic() - started

    table = Table(title=f"GPU check on {report['device']} (torch {torch.__version__}): {args.steps} steps x {args.accum} accumulation"
                        + (", tiny model" if args.tiny else ""))
    for col in ("config", "params", "B x T", "compile", "tokens/s", "MFU", "peak GB", "plan GB", "peak/plan", "run s"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(r["config"], f"{r['params'] / 1e6:,.1f}M", f"{r['micro_batch']}x{r['seq_len']}", "yes" if r["compile"] else "no",
                      _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["mfu"], ".1%"), f"{r['peak_mem_gb']:.2f}", f"{r['planned_gb']:.2f}",
                      _fmt(r["peak_vs_plan"], ".2f"), f"{r['seconds']:.0f}")
    console.print(table)
    ck = report["checkpoint"]
    tests = report["gpu_tests"]
    console.print(f"save ({ck['config']}, blocking 'final'): {_fmt(ck['save_s'], '.1f')} s | resume to step {ck['resumed_step']}: "
                  f"{ck['resume_s']:.1f} s | tests/gpu: {tests.get('summary', tests.get('skipped'))} | "
                  f"total {report['total_seconds'] / 60:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    if tests.get("returncode", 0) != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
