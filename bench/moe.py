"""Training tokens/s of a mixture-of-experts model against a dense model with the same active parameters.

Baseline: the dense SwiGLU model of the same width and depth whose MLP is as wide as the ``top_k``
experts a token visits together (``hidden = top_k * expert_hidden``), so both do the same matmul
FLOPs per token; the MoE adds only the router (``d_model x num_experts`` per layer), the sort,
gather and scatter of tokens, and the auxiliary losses. The issue's target: MoE >= 0.7x the dense
tokens/s. Each step is a full training step (forward, backward, clip, AdamW); the two models
alternate for ``--rounds`` rounds and the best round of each is kept, so a noisy shared machine
penalises both alike.

    python bench/moe.py                               # CPU: a mac_mini-shaped model scaled down
    python bench/moe.py --device cuda --shape mac_mini --batch 8 --seq 1024   # on a GPU (bf16, grouped matmul)
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow the
# standard library's tokenize (imported by inspect, which torch imports): drop it first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import platform
import time

import torch
from rich.console import Console
from rich.table import Table

from training.config import ModelConfig
from training.distributed import resolve_device
from training.model import Transformer, build_meta_model, count_parameters
from training.moe import inactive_parameters
from training.presets import PROJECT_ROOT

RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
SHAPES = {  # d_model, layers, heads, experts, top_k, expert_hidden
    "small": (256, 4, 4, 6, 2, 384),  # mac_mini's expert count and routing at a CPU-sized width
    "mac_mini": (512, 14, 8, 6, 2, 1536),
}


def pair(shape: str, vocab: int, seq: int) -> dict[str, ModelConfig]:
    d, layers, heads, experts, top_k, hidden = SHAPES[shape]
    common = dict(vocab_size=vocab, d_model=d, num_layers=layers, max_seq_len=seq, attention={"n_heads": heads})
    return {
        "dense": ModelConfig(**common, ffn={"type": "swiglu", "hidden_size": top_k * hidden}),
        "moe": ModelConfig(**common, ffn={"type": "moe", "num_experts": experts, "top_k": top_k, "expert_hidden_size": hidden}),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_second(cfg: ModelConfig, device: torch.device, batch: int, seq: int, steps: int, compile_model: bool):
    """A closure timing ``steps`` training steps (after one warm-up step on first use)."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    net = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def step() -> None:
        with autocast:
            _, loss = net(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()

    def timed() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        return steps * batch * seq / (time.perf_counter() - t0)

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device, 0)
    console = Console(width=150)
    cfgs = pair(args.shape, args.vocab, args.seq)
    runners = {name: steps_per_second(cfg, device, args.batch, args.seq, args.steps, args.compile) for name, cfg in cfgs.items()}
    best = {name: 0.0 for name in cfgs}
    for _ in range(args.rounds):
        for name, timed in runners.items():
            best[name] = max(best[name], timed())
    rows = []
    for name, cfg in cfgs.items():
        total = count_parameters(build_meta_model(cfg))
        rows.append({"model": name, "total_params_m": total / 1e6, "active_params_m": (total - inactive_parameters(cfg)) / 1e6,
                     "tokens_per_s": best[name]})
    ratio = best["moe"] / best["dense"]
    d, layers, heads, experts, top_k, hidden = SHAPES[args.shape]
    table = Table(title=f"MoE vs dense at equal active parameters on {device} "
                        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
                        f"{args.shape}: {layers} x {d}, {experts} experts top-{top_k} x {hidden}, batch {args.batch} x {args.seq}")
    for col in ("model", "total params", "active params", "tokens/s", "vs dense"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['total_params_m']:.1f}M", f"{r['active_params_m']:.1f}M", f"{r['tokens_per_s']:,.0f}",
                      f"{r['tokens_per_s'] / best['dense']:.2f}x")
    console.print(table)
    console.print(f"MoE / dense tokens/s: {ratio:.2f}x (target >= 0.70x)")
    out = RESULTS_DIR / f"moe_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "moe", "command": "python bench/moe.py " + " ".join(sys.argv[1:]), "device": str(device),
                               "torch": torch.__version__, "shape": args.shape, "batch": args.batch, "seq_len": args.seq,
                               "steps": args.steps, "rounds": args.rounds, "compile": args.compile, "rows": rows,
                               "moe_over_dense": ratio, "target": 0.7}, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
