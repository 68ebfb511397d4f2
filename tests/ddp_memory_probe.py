"""Run under torchrun (1 rank, gloo) by tests/test_distributed.py: peak host RSS (VmHWM, reset through
/proc/self/clear_refs) of training steps after DDP's first iteration (when its gradients become
bucket views), through the trainer's own build_model, train_step and Dist.zero_grad. With glibc told
to mmap every block over 64 KiB, freed tensors leave the resident set, so the peak is what is live.
Writes ``reports/rank0.json`` under the working directory."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from training.config import TrainConfig
from training.distributed import setup
from training.optim import build_optimizer
from training.parallelize import build_model
from training.precision import resolve_precision
from training.preemption import MicroStepAgreement, StopFlag
from training.trainer import train_step

from accum_probe import Rows
from rank_reports import write_report

VOCAB, SEQ, BATCH, ACCUM = 16000, 128, 2, 2


def vm_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def main(strategy: str) -> None:
    cfg = TrainConfig(train_data="unused", device="cpu", seq_len=SEQ, batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                      model={"vocab_size": VOCAB, "d_model": 512, "num_layers": 2, "max_seq_len": SEQ, "attention": {"n_heads": 8},
                             "ffn": {"hidden_size": 1408}},
                      distributed={"strategy": strategy, "timeout_s": 120})
    dist = setup(cfg.distributed, "cpu")
    model, net = build_model(cfg, dist, None)
    optimizer = build_optimizer(net, cfg.optimizer, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    precision = resolve_precision("float32", True, dist.device, fsdp=False)
    gen = torch.Generator().manual_seed(0)
    peaks = []
    for _ in range(3):
        x, y = (torch.randint(0, VOCAB, (ACCUM, BATCH, SEQ), generator=gen) for _ in range(2))
        Path("/proc/self/clear_refs").write_text("5")
        train_step(net, Rows(x, y), optimizer, scaler, precision, dist, ACCUM, 1.0, MicroStepAgreement(dist, StopFlag()))
        optimizer.step()
        dist.zero_grad(optimizer)
        peaks.append(vm_mb("VmHWM"))
    grads_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    write_report(Path("reports"), dist.rank, {"strategy": dist.strategy, "grads_mb": grads_mb, "peak_mb": peaks[-1]})
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
