"""The GPU memory plan of a config, per strategy, without a GPU: what docs/performance.md tabulates.

    .venv/bin/python bench/memory_plan.py [configs/runpod_1b.yaml configs/runpod_2b.yaml ...] [--gpus 1 2 4 8]

Per GPU, in GB (1e9 bytes):

- parameters, gradients and AdamW state are exact byte counts of the model this config builds
  (float32 master weights and gradients, two float32 moments; bf16 is the compute dtype only), kept
  whole on every rank under DDP and divided by the number of ranks under FSDP2;
- activations are *measured*: one forward pass of the real model on the meta device, in bfloat16,
  with ``saved_tensors_hooks`` adding up every tensor autograd keeps for the backward pass (weights
  excluded), at the config's micro-batch and seq_len, with and without activation checkpointing;
  the T x T attention matrices of SDPA's math path (the meta device's) are replaced by what flash
  attention keeps on a GPU (a float32 logsumexp per head and position);
- transient terms: the bf16 copy of the weights that autocast keeps during a step (DDP), or the
  largest unsharded block FSDP gathers at a time (twice: the one in use and the one prefetched).

The baseline is the rule of thumb of 16 bytes per parameter plus nothing for activations, which
is what people budget first and what makes a 2B run fail on an 80 GB card at batch 8. Allocator
fragmentation and CUDA context (~1-3 GB) are not included. Writes bench/results/memory_plan.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow the
# standard library's tokenize (imported by inspect, which torch imports): drop it first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json

import torch
from rich.console import Console
from rich.table import Table

from training.config import TrainConfig, load_config
from training.model import build_meta_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "memory_plan.json"
GB = 1e9


def saved_activation_bytes(cfg: TrainConfig, checkpointing: bool) -> int:
    """Bytes autograd saves for backward in one bf16 forward at (batch_size, seq_len), weights excluded."""
    model = build_meta_model(cfg.model).to(torch.bfloat16)
    model.activation_checkpointing = checkpointing
    model.train()
    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t
        if t.dim() >= 2 and t.shape[-2:] == (cfg.seq_len, cfg.seq_len):
            return t  # a T x T attention matrix: the meta device runs SDPA's math path; flash on a GPU keeps none
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            total += base.numel() * base.element_size()
        return t

    idx = torch.zeros((cfg.batch_size, cfg.seq_len), dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    flash_lse = cfg.model.num_layers * cfg.batch_size * cfg.model.attention.n_heads * cfg.seq_len * 4  # float32 logsumexp
    return total + flash_lse


def plan(cfg: TrainConfig, gpus: list[int]) -> list[dict]:
    model = build_meta_model(cfg.model)
    n = count_parameters(model)
    largest_block = max(sum(p.numel() for p in block.parameters()) for block in model.layers)
    state = {"parameters": 4 * n, "gradients": 4 * n, "adamw": 8 * n}
    acts = {False: saved_activation_bytes(cfg, False), True: saved_activation_bytes(cfg, True)}
    rows = []
    for strategy in ["ddp", *(f"fsdp x{g}" for g in gpus)]:
        world = 1 if strategy == "ddp" else int(strategy.split("x")[1])
        transient = 2 * n if strategy == "ddp" else 2 * (2 * largest_block)
        for ckpt in (False, True):
            sharded = {k: v / world for k, v in state.items()}
            total = sum(sharded.values()) + acts[ckpt] + transient
            rows.append({"strategy": strategy, "activation_checkpointing": ckpt, "params": n,
                         **{f"{k}_gb": v / GB for k, v in sharded.items()}, "activations_gb": acts[ckpt] / GB,
                         "transient_gb": transient / GB, "total_gb": total / GB, "rule_of_thumb_gb": 16 * n / world / GB})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=["configs/runpod_1b.yaml", "configs/runpod_2b.yaml"])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 8])
    args = parser.parse_args()
    console = Console(highlight=False, width=150)
    results = {}
    for path in args.configs:
        cfg = load_config(path)
        rows = plan(cfg, args.gpus)
        results[path] = {"micro_batch": cfg.batch_size, "seq_len": cfg.seq_len, "rows": rows}
        table = Table(title=f"{path}: {rows[0]['params'] / 1e9:.2f}B parameters, micro-batch {cfg.batch_size} x {cfg.seq_len} "
                            f"(GB per GPU; baseline: 16 bytes/parameter)")
        for col in ("strategy", "act. ckpt", "params", "grads", "AdamW", "activations", "transient", "total", "baseline"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r["strategy"], "yes" if r["activation_checkpointing"] else "no",
                          *(f"{r[k]:.1f}" for k in ("parameters_gb", "gradients_gb", "adamw_gb", "activations_gb",
                                                    "transient_gb", "total_gb", "rule_of_thumb_gb")))
        console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"bench": "memory_plan", "command": "python bench/memory_plan.py", "configs": results}, indent=2))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
