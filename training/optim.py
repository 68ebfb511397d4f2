"""Optimizer and learning-rate schedule from the config.

Weight decay applies to matrices only (dim >= 2: linear weights and embeddings), never to norms
or biases, as in GPT-2/nanoGPT. The schedule is a multiplier on ``optimizer.lr`` per optimizer
step, so it resumes exactly from the scheduler's saved step count.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from training.config import OptimizerConfig, SchedulerConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device_type: str, host_state: bool = False) -> torch.optim.Optimizer:
    """``host_state``: AdamW with its moments in host memory (``optimizer.cpu_offload`` without FSDP)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if host_state:
        from training.host_optimizer import HostAdamW

        return HostAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.type == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device_type == "cuda":
        kwargs["fused"] = True
    if cfg.type == "adam":
        # Adam's weight decay is L2 added to the gradient; keep it opt-in by the same key.
        return torch.optim.Adam(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def lr_multiplier(cfg: SchedulerConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s`` (0-based) for each schedule type.

    ``cosine``/``linear``: linear warmup over ``warmup_steps`` then decay to ``min_lr_ratio`` at
    the last step. ``constant``: warmup then flat. ``wsd``: 10% warmup, 80% stable, 10% cosine
    decay to ``min_lr_ratio`` (its warmup is the 10%, not ``warmup_steps``).
    """
    floor = cfg.min_lr_ratio
    warmup = max(1, round(0.1 * total_steps)) if cfg.type == "wsd" else cfg.warmup_steps

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.type == "constant":
            return 1.0
        if cfg.type == "wsd":
            decay_start = total_steps - max(1, round(0.1 * total_steps))
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        else:
            progress = min(1.0, (step - warmup + 1) / max(1, total_steps - warmup))
        if cfg.type == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_multiplier(cfg, total_steps))
