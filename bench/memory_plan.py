"""The GPU memory plan of a config, per strategy, without a GPU: what docs/performance.md tabulates.

    python bench/memory_plan.py [configs/runpod_1b.yaml ...] [--gpus 2 8] [--choose configs/runpod_4b.yaml]
    python bench/memory_plan.py --measure          # on a CUDA machine: the plan against the real peak

GB (1e9 bytes) per GPU from ``training.memory_plan.plan`` (its docstring says what each term is
and how the activations are measured on the meta device). Baseline: the rule of thumb of 16 bytes
per parameter (float32 weights, gradients, two AdamW moments) and nothing for activations, which
is what people budget first. ``--choose`` tabulates micro-batch x activation checkpointing for a
config under FSDP on the largest ``--gpus`` against ``--budget`` GB: how runpod_4b's were chosen.

Compile margin: what one block saves for backward once ``torch.compile`` partitions it (AOTAutograd
with inductor's min-cut partitioner, traced on the meta device with no code generated), against the
eager count the plan uses, bf16 parameters (FSDP). ``--measure`` trains each config for 2 steps on
this GPU on one process (the trainer itself, synthetic tokens) and sets ``max_memory_allocated``
against the plan, skipping a config whose plan exceeds the GPU. Writes bench/results/memory_plan.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow the
# standard library's tokenize (imported by inspect, which torch imports): drop it first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import tempfile
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from training.config import TrainConfig, load_config
from training.memory_plan import MemoryPlan, _flash_sdpa, activation_profile, plan
from training.model import Block, rope_tables

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


def compiled_block_bytes(cfg: TrainConfig) -> int:
    """Bytes one block saves for backward after AOTAutograd's min-cut partition (inductor's), bf16, meta device."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    with torch.device("meta"):
        block = Block(cfg.model).to(torch.bfloat16)
    rope = rope_tables(cfg.model.head_dim, cfg.seq_len, cfg.model.positional.theta, torch.device("meta"))
    x = torch.empty(cfg.batch_size, cfg.seq_len, cfg.model.d_model, dtype=torch.bfloat16, device="meta", requires_grad=True)
    params = {id(p) for p in block.parameters()}
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params:
            saved[id(base)] = base
        return t

    with mock.patch.object(F, "scaled_dot_product_attention", _flash_sdpa), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.compile(block, backend=backend, fullgraph=True)(x, rope)
    torch._dynamo.reset()
    return sum(t.untyped_storage().nbytes() for t in saved.values())


def compile_margin(cfg: TrainConfig) -> dict:
    eager = activation_profile(cfg, "bf16").block
    compiled = compiled_block_bytes(cfg)
    return {"eager_block_gb": eager / GB, "compiled_block_gb": compiled / GB, "compiled_over_eager": compiled / eager}


def measure(path: str, console: Console) -> dict:
    """Two steps of the trainer on this GPU, one process: ``max_memory_allocated`` against the plan."""
    from training.token_shards import write_token_shard
    from training.trainer import train

    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(path, ["num_steps=2", "log_every=1", "eval_every=1000000000", "save_every=1000000000", "save_final=false",
                                 f"train_data={tmp}/data", "val_data=null", "save_every_minutes=null", f"checkpoint_dir={tmp}/ckpt",
                                 "gradient_accumulation_steps=2", "distributed.strategy=none"])
        planned = plan(cfg, 1, "none")
        if planned.peak_bytes > 0.95 * torch.cuda.get_device_properties(device).total_memory:
            return {"config": path, "planned_gb": planned.peak_bytes / GB, "skipped": "the plan exceeds this GPU"}
        tokens = 8 * cfg.batch_size * (cfg.seq_len + 1) + 1
        vocab = cfg.model.vocab_size
        write_token_shard(f"{tmp}/data/shard_00000.tok", np.random.default_rng(0).integers(0, vocab - 1, tokens), vocab, vocab - 1)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        train(cfg, console=Console(quiet=True))
        measured = torch.cuda.max_memory_allocated(device)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"config": path, "planned_gb": planned.peak_bytes / GB, "measured_gb": measured / GB,
            "measured_over_planned": measured / planned.peak_bytes, "compile": cfg.compile_model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=["configs/runpod_1b.yaml", "configs/runpod_2b.yaml", "configs/runpod_4b.yaml"])
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--choose", default="configs/runpod_4b.yaml", help="config to tabulate micro-batch choices for ('' = none)")
    parser.add_argument("--budget", type=float, default=64.0, help="GB per GPU the chosen setting must stay under (80 GB card, "
                                                                    "minus fragmentation, NCCL and CUDA context)")
    parser.add_argument("--measure", action="store_true", help="on CUDA: train each config 2 steps, plan against max_memory_allocated")
    parser.add_argument("--no-compile-margin", action="store_true", help="skip tracing a compiled block per config")
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
        if not args.no_compile_margin:
            margin = results["configs"][path]["compile_margin"] = compile_margin(cfg)
            console.print(f"{path}: one block saves {margin['eager_block_gb']:.3f} GB eager (the plan), "
                          f"{margin['compiled_block_gb']:.3f} GB compiled: {margin['compiled_over_eager']:.0%} (bf16)")
    if args.measure:
        if not torch.cuda.is_available():
            raise SystemExit("memory_plan.py: --measure needs a CUDA device")
        results["measured"] = [measure(path, console) for path in args.configs]
        for m in results["measured"]:
            console.print(f"{m['config']}: planned {m['planned_gb']:.2f} GB, "
                          + (m["skipped"] if "skipped" in m else f"measured {m['measured_gb']:.2f} GB ({m['measured_over_planned']:.2f}x)"))
    if args.choose:
        results["choice"] = {"config": args.choose, "world": max(args.gpus), "budget_gb": args.budget,
                             "rows": choose(args.choose, load_config(args.choose), max(args.gpus), args.budget, console)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
