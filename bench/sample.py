"""Sampling speed: the KV cache against the uncached loop, on the CPU.

    python bench/sample.py [--new-tokens 256] [--prompt-tokens 32] [--d-model 384 --layers 6 --vocab 16384]

A Llama-style model (random weights: speed does not depend on them) decodes greedily from the
same prompt twice: with ``training.generate.generate`` (prompt once into the cache, then one
position per token) and with the baseline ``generate_uncached`` (the whole prefix again for every
token, what ``Transformer.generate`` did before the cache). Both must give the same tokens; the
table shows tokens/s of each and the speed-up. Writes bench/results/sample.json.
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
from training.generate import SamplingParams, generate, generate_uncached
from training.model import Transformer, count_parameters

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sample.json"


def timed(fn, model: Transformer, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
    fn(model, prompt, SamplingParams(4, 0.0))  # warm-up: first-call allocations out of the timing
    t0 = time.perf_counter()
    out = fn(model, prompt, params)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16384)
    args = parser.parse_args()
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                      max_seq_len=args.prompt_tokens + args.new_tokens, attention={"n_heads": args.heads})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, args.vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(args.new_tokens, 0.0)
    cached, t_cached = timed(generate, model, prompt, params)
    uncached, t_uncached = timed(generate_uncached, model, prompt, params)
    same = cached == uncached
    rows = [("uncached (baseline: whole prefix per token)", t_uncached), ("KV cache", t_cached)]
    table = Table(title=f"greedy decoding, {args.new_tokens} new tokens after {args.prompt_tokens}, "
                        f"{count_parameters(model) / 1e6:.1f}M parameters, CPU x{torch.get_num_threads()} threads")
    for col in ("path", "seconds", "tokens/s", "vs baseline"):
        table.add_column(col, justify="right")
    for name, seconds in rows:
        table.add_row(name, f"{seconds:.2f}", f"{args.new_tokens / seconds:,.1f}", f"{t_uncached / seconds:.1f}x")
    console = Console(highlight=False)
    console.print(table)
    console.print(f"same tokens: {same}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "model": cfg.model_dump(mode="json"), "parameters": count_parameters(model), "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "baseline": "uncached", "uncached_s": t_uncached, "cached_s": t_cached,
        "speedup": t_uncached / t_cached, "same_tokens": same,
    }, indent=2) + "\n")
    console.print(f"wrote {RESULTS.relative_to(ROOT)}")
    if not same:
        sys.exit("KV-cache tokens differ from the uncached ones")


if __name__ == "__main__":
    main()
