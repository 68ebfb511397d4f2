"""Run under torchrun by tests/test_parallelize.py: peak host RSS (VmHWM, reset through
/proc/self/clear_refs) of each rank while the model is built, while a checkpoint is saved and while
it is restored, through the same functions the trainer calls. Each rank writes its report to
``reports/rank<N>.json`` under the working directory."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from training.checkpointer import Checkpointer
from training.config import validate_config
from training.distributed import setup
from training.optim import build_optimizer
from training.parallelize import build_model

from rank_reports import write_report


def peak_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def current_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def reset_peak() -> float:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return current_mb()


def main(config_path: str) -> None:
    cfg = validate_config(json.loads(open(config_path).read()))
    dist = setup(cfg.distributed, "cpu")
    before = reset_peak()
    model, net = build_model(cfg, dist, None)
    report = {"rank": dist.rank, "build_mb": peak_mb() - before}
    optimizer = build_optimizer(net, cfg.optimizer, "cpu")
    x = torch.randint(0, cfg.model.vocab_size, (1, cfg.seq_len))
    net(x, x)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    checkpoints = Checkpointer(cfg.checkpoint_dir, dist, cfg.to_plain(), 2, cfg.model.tie_embeddings, print)
    loader = {"epoch": 0, "index": 0, "offset": 0}
    state = {"scheduler": {}, "scaler": {}, "loader": loader, "tokens_seen": 0, "best_val_loss": 1.0, "world_size": dist.world_size}
    before = reset_peak()
    checkpoints.save(["step0000001"], 1, net, optimizer, state, {}, block=True)
    checkpoints.wait()
    report["save_mb"] = peak_mb() - before
    before = reset_peak()
    restored = checkpoints.restore("auto", net, optimizer)
    report["restore_mb"] = peak_mb() - before
    report["restored_step"] = restored.step if restored else None
    write_report(Path("reports"), dist.rank, report)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
