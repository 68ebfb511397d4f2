"""Benchmark: SFT batches packed with ``doc_ids`` against padded ones (the named baseline), on the real train step.

    .venv/bin/python bench/sft.py [--device cpu|cuda] [--steps 10] [--seq-len 256] [--batch-size 8]
                                  [--d-model 128] [--layers 2] [--out bench/results/sft.json]

Examples have chat-like lengths (log-normal, median ``seq_len/6``, cut at ``seq_len``: most are short,
a few long, as in ultrachat/alpaca mixes), their ids random and half of their tokens loss-bearing.
Both layouts run the trainer's own step (training/trainer.py ``train_step``: forward, backward,
clip, AdamW) through the SFT loader of training/sft/loader.py, with the same batch size and
``seq_len``: ``packed`` fills every row with several examples and a block-diagonal mask,
``padded`` takes one example per row padded to the longest of the micro-batch. Packed rows run twice:
``packed/sdpa`` with the dense (B,1,T,T) mask (the reference) and ``packed/flex`` with FlexAttention's
document-causal BlockMask (``model.attention.impl``). Flex trains only on CUDA (torch has no CPU
FlexAttention backward), so on CPU its row is listed as skipped. Reported per row: examples and real
(non-padding) tokens per second, the share of positions that are real tokens, and the speed-up over
``padded``; on CUDA also the attention kernels one step launched (from the profiler). Prints a table
and writes the JSON.
"""

from __future__ import annotations

import os
import sys

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH]  # bench/tokenize.py shadows tokenize

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from training.config import ModelConfig  # noqa: E402
from training.distributed import setup  # noqa: E402
from training.model import Transformer, attention_impl  # noqa: E402
from training.precision import resolve_precision  # noqa: E402
from training.preemption import MicroStepAgreement, StopFlag  # noqa: E402
from training.sft.loader import Examples, SFTLoader  # noqa: E402
from training.trainer import train_step  # noqa: E402

BASELINE = "padded"


def make_examples(n: int, seq_len: int, vocab: int, seed: int = 0) -> Examples:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(seq_len / 6), 0.8, n).astype(int), 8, seq_len + 1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(0, vocab, offsets[-1]).astype(np.int32)
    mask = np.zeros(offsets[-1], dtype=bool)
    for a, b in zip(offsets[:-1], offsets[1:]):
        mask[(a + b) // 2 : b] = True  # the second half: the "assistant" part
    return Examples(tokens, mask, offsets, {})


class Counting:
    """The loader, counting the examples it hands out and their real tokens (one epoch: no wrap)."""

    def __init__(self, loader: SFTLoader) -> None:
        self.loader, self.real, self.positions, self.examples = loader, 0, 0, 0

    def next_batch(self):
        before = self.loader.state.cursor
        x, y, doc = self.loader.next_batch()
        after = self.loader.state.cursor
        if self.loader.state.epoch:
            raise SystemExit("bench/sft.py: the run went past one epoch; raise --examples")
        taken = self.loader.order(0)[before:after]
        self.examples += len(taken)
        self.real += int(self.loader.lengths[taken].sum())
        self.positions += x.numel()
        return x, y, doc


ATTENTION_KERNEL_WORDS = ("attention", "attn", "fmha", "flash", "flex", "triton_tem", "softmax", "sdpa")


def attention_kernels(step, device: torch.device) -> list[str]:
    """Names of the CUDA kernels one ``step`` launches that do attention (empty off CUDA)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in ATTENTION_KERNEL_WORDS)})


def run(layout: str, impl: str, args, examples: Examples, dist, precision) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers, max_seq_len=args.seq_len,
                      attention={"n_heads": max(1, args.d_model // 64), "impl": impl})
    model = Transformer(cfg).to(dist.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=False)
    batches = Counting(SFTLoader(examples, args.batch_size, args.seq_len, layout, seed=0))
    agreement = MicroStepAgreement(dist, StopFlag())

    def step() -> None:
        train_step(model, batches, opt, scaler, precision, dist, 1, 1.0, agreement)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (allocator, kernels, flex's compile)
        step()
    kernels = attention_kernels(step, dist.device)
    batches.real = batches.positions = batches.examples = 0
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    name = layout if layout == BASELINE else f"{layout}/{impl}"
    return {"layout": name, "attention": impl, "attention_kernels": kernels, "steps": args.steps, "seconds": seconds, "examples_per_s": batches.examples / seconds,
            "real_tokens_per_s": batches.real / seconds, "real_share": batches.real / max(1, batches.positions),
            "ms_per_step": 1000 * seconds / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sft.json")
    args = parser.parse_args()
    from training.config import DistributedConfig

    dist = setup(DistributedConfig(strategy="none"), args.device)
    precision = resolve_precision(args.dtype, True, dist.device, fsdp=False)
    examples = make_examples(args.examples, args.seq_len, args.vocab)
    rows = [run(BASELINE, "sdpa", args, examples, dist, precision), run("packed", "sdpa", args, examples, dist, precision)]
    probe = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=1, max_seq_len=args.seq_len,
                        attention={"n_heads": max(1, args.d_model // 64)})
    skipped = {}
    if attention_impl(probe, dist.device, training=True) == "flex":
        rows.append(run("packed", "flex", args, examples, dist, precision))
    else:
        skipped["packed/flex"] = f"FlexAttention has no backward on {dist.device.type} in torch {torch.__version__}"
    base = rows[0]
    for r in rows:
        r["speedup_vs_padded"] = r["real_tokens_per_s"] / base["real_tokens_per_s"]
    table = Table(title=f"SFT layouts on {dist.device} ({args.dtype}), B={args.batch_size} T={args.seq_len}, "
                        f"d_model={args.d_model} x{args.layers}; baseline: {BASELINE}")
    for col in ("layout", "examples/s", "real tokens/s", "real share", "ms/step", "vs padded"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["layout"], f"{r['examples_per_s']:,.0f}", f"{r['real_tokens_per_s']:,.0f}", f"{r['real_share']:.0%}",
                      f"{r['ms_per_step']:.1f}", f"{r['speedup_vs_padded']:.2f}x")
    Console().print(table)
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    for r in rows:
        if r["attention_kernels"]:
            print(f"{r['layout']} attention kernels: {', '.join(r['attention_kernels'])}")
    device_name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else platform.processor() or platform.machine()
    result = {"device": device_name, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
              "baseline": BASELINE, "rows": rows, "skipped": skipped}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
