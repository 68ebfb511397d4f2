"""The GPU memory plan of a config, per strategy, without a GPU: what docs/performance.md tabulates.

    python bench/memory_plan.py [configs/runpod_1b.yaml ...] [--gpus 2 8] [--choose configs/runpod_4b.yaml]

GB (1e9 bytes) per GPU from ``training.memory_plan.plan`` (its docstring says what each term is
and how the activations are measured on the meta device). Baseline: the rule of thumb of 16 bytes
per parameter (float32 weights, gradients, two AdamW moments) and nothing for activations, which
is what people budget first. ``--choose`` tabulates micro-batch x activation checkpointing for a
config under FSDP on the largest ``--gpus`` against ``--budget`` GB: how runpod_4b's were chosen.
Writes bench/results/memory_plan.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow the
# standard library's tokenize (imported by inspect, which torch imports): drop it first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json

from rich.console import Console
from rich.table import Table

from training.config import TrainConfig, load_config
from training.memory_plan import MemoryPlan, plan

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "memory_plan.json"
GB = 1e9
COLUMNS = {"parameters": "params", "gradients": "grads", "adamw": "AdamW", "fsdp_accumulation_grads": "FSDP accum. grads",
           "weight_copies": "bf16 weights", "activations": "activations"}


def _ac_label(p: MemoryPlan) -> str:
    return "no" if not p.activation_checkpointing else ("all" if p.ac_every == 1 else f"1 in {p.ac_every}")


def config_rows(cfg: TrainConfig, gpus: list[int]) -> list[MemoryPlan]:
    """One GPU, then FSDP on each count in ``gpus``; each without and with activation checkpointing
    (the config's ``ac_every``, or every block when the config has it off)."""
    rows = []
    for world, strategy in [(1, "none"), *((g, "fsdp") for g in gpus)]:
        for ac in (False, True):
            rows.append(plan(cfg, world, strategy, activation_checkpointing=ac, ac_every=cfg.ac_every))
    return rows


def plan_table(title: str, rows: list[MemoryPlan]) -> Table:
    table = Table(title=title)
    for col in ("strategy", "act. ckpt", *COLUMNS.values(), "largest transient", "total", "16 B/param"):
        table.add_column(col, justify="right")
    for p in rows:
        name, worst = max(p.transients.items(), key=lambda kv: kv[1])
        table.add_row("1 GPU" if p.strategy == "none" else f"{p.strategy.upper()} x{p.world}", _ac_label(p),
                      *(f"{p.terms.get(k, 0) / GB:.1f}" for k in COLUMNS), f"{worst / GB:.1f} ({name})",
                      f"[bold]{p.peak_bytes / GB:.1f}[/]", f"{16 * p.params / (p.world if p.strategy == 'fsdp' else 1) / GB:.1f}")
    return table


def choose(path: str, cfg: TrainConfig, world: int, budget_gb: float, console: Console) -> list[dict]:
    """Micro-batch x checkpointing under FSDP on ``world`` GPUs, keeping sequences per rank per step."""
    per_rank = cfg.batch_size * cfg.gradient_accumulation_steps
    table = Table(title=f"{path}: FSDP x{world}, {per_rank} sequences per rank per step, "
                        f"budget {budget_gb:.0f} GB (GB per GPU; recompute = share of blocks run twice)")
    for col in ("micro-batch", "accumulation", "act. ckpt", "recompute", "total", "fits"):
        table.add_column(col, justify="right")
    out = []
    for micro in (1, 2, 4, 8):
        if per_rank % micro:
            continue
        trial = cfg.model_copy(update={"batch_size": micro, "gradient_accumulation_steps": per_rank // micro})
        for every in (None, 4, 3, 2, 1):
            p = plan(trial, world, "fsdp", activation_checkpointing=every is not None, ac_every=every)
            share = 0.0 if every is None else -(-cfg.model.num_layers // every) / cfg.model.num_layers
            fits = p.peak_bytes / GB <= budget_gb
            table.add_row(str(micro), str(per_rank // micro), _ac_label(p), f"{share:.0%}", f"{p.peak_bytes / GB:.1f}",
                          "yes" if fits else "[red]no[/]")
            out.append({"micro_batch": micro, "accumulation": per_rank // micro, "ac_every": every,
                        "recompute_share": share, "peak_gb": p.peak_bytes / GB, "fits": fits})
    console.print(table)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=["configs/runpod_1b.yaml", "configs/runpod_2b.yaml", "configs/runpod_4b.yaml"])
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--choose", default="configs/runpod_4b.yaml", help="config to tabulate micro-batch choices for ('' = none)")
    parser.add_argument("--budget", type=float, default=64.0, help="GB per GPU the chosen setting must stay under (80 GB card, "
                                                                    "minus fragmentation, NCCL and CUDA context)")
    args = parser.parse_args()
    console = Console(highlight=False, width=170)
    results: dict = {"bench": "memory_plan", "command": "python bench/memory_plan.py", "baseline": "16 bytes per parameter",
                     "configs": {}}
    for path in args.configs:
        cfg = load_config(path)
        rows = config_rows(cfg, args.gpus)
        console.print(plan_table(f"{path}: {rows[0].params / 1e9:.2f}B parameters, micro-batch {cfg.batch_size} x {cfg.seq_len}, "
                                 f"accumulation {cfg.gradient_accumulation_steps} (GB per GPU)", rows))
        results["configs"][path] = {"micro_batch": cfg.batch_size, "seq_len": cfg.seq_len,
                                    "accumulation": cfg.gradient_accumulation_steps, "rows": [p.as_dict() for p in rows]}
    if args.choose:
        results["choice"] = {"config": args.choose, "world": max(args.gpus), "budget_gb": args.budget,
                             "rows": choose(args.choose, load_config(args.choose), max(args.gpus), args.budget, console)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
