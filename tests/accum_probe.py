"""Run under torchrun (2 ranks, gloo) by tests/test_accumulation.py: the trainer's own ``train_step``
with accumulation 4 on masked targets whose valid counts differ per micro-batch and rank, spied on
where the gradients are reduced (FSDP2's ``FSDPParamGroup.post_backward`` and ``foreach_reduce``, a
DDP communication hook), then compared with accumulation 1 over the same rows (a 4x micro-batch) and
with one process over every rank's tokens. Each rank writes ``reports/rank<N>.json`` under the working directory."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from training.config import TrainConfig
from training.distributed import Dist, setup
from training.loss import IGNORE_INDEX
from training.optim import build_optimizer
from training.parallelize import build_model
from training.precision import resolve_precision
from training.preemption import MicroStepAgreement, StopFlag
from training.trainer import train_step

from rank_reports import write_report

ACCUM, BATCH, SEQ, VOCAB = 4, 2, 16, 97


class Rows:
    """Feeds prepared (x, y) micro-batches to train_step in place of the shard loader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.items = list(zip(x, y))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items.pop(0)


def data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(world, ACCUM, BATCH, SEQ) tokens and targets; each row ignores a different-length prefix (a prompt),
    and rank 1's second micro-batch ignores everything."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (world, ACCUM, BATCH, SEQ), generator=gen)
    y = torch.randint(0, VOCAB, (world, ACCUM, BATCH, SEQ), generator=gen)
    prompt = torch.randint(0, SEQ - 1, (world, ACCUM, BATCH, 1), generator=gen)
    y = y.masked_fill(torch.arange(SEQ) < prompt, IGNORE_INDEX)
    if world > 1:
        y[1, 1] = IGNORE_INDEX
    return x, y


class Spy:
    """Events per micro-step: ("sync", reduce_grads) for each FSDP param group's post_backward, "reduce"
    for each gradient reduction (FSDP's foreach_reduce or a DDP bucket's all-reduce)."""

    def __init__(self, net: torch.nn.Module, strategy: str) -> None:
        self.steps: list[list] = []
        net.register_forward_pre_hook(lambda *_: self.steps.append([]))
        if strategy == "ddp":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                self.steps[-1].append("reduce")
                return allreduce_hook(state, bucket)

            net.register_comm_hook(None, hook)
        elif strategy == "fsdp":
            from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

            post_backward, foreach_reduce = group.FSDPParamGroup.post_backward, group.foreach_reduce

            def spy_post_backward(this, *args, **kwargs):
                self.steps[-1].append(("sync", bool(this.reduce_grads)))
                return post_backward(this, *args, **kwargs)

            def spy_reduce(*args, **kwargs):
                self.steps[-1].append("reduce")
                return foreach_reduce(*args, **kwargs)

            group.FSDPParamGroup.post_backward = spy_post_backward
            group.foreach_reduce = spy_reduce

    def pattern(self) -> list[dict]:
        return [{"reduces": sum(e == "reduce" for e in step),
                 "sync": sorted({e[1] for e in step if isinstance(e, tuple)})} for step in self.steps]


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for k, p in model.named_parameters() if p.grad is not None}


def step(net, model, dist: Dist, x, y, accum: int) -> tuple[float, dict[str, torch.Tensor]]:
    cfg_opt = TrainConfig(train_data="unused").optimizer
    optimizer = build_optimizer(net, cfg_opt, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    precision = resolve_precision("float32", True, dist.device, fsdp=dist.strategy == "fsdp")
    loss, _ = train_step(net, Rows(x, y), optimizer, scaler, precision, dist, accum, 0.0, MicroStepAgreement(dist, StopFlag()))
    grads = full_grads(model)
    optimizer.zero_grad(set_to_none=True)
    return float(loss), grads


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main(strategy: str, fsdp_no_sync: bool) -> None:
    cfg = TrainConfig(train_data="unused", device="cpu", seq_len=SEQ, batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                      model={"vocab_size": VOCAB, "d_model": 32, "num_layers": 2, "max_seq_len": SEQ, "attention": {"n_heads": 4},
                             "ffn": {"hidden_size": 64}},
                      distributed={"strategy": strategy, "fsdp_no_sync": fsdp_no_sync, "timeout_s": 60})
    dist = setup(cfg.distributed, "cpu")
    x, y = data(dist.world_size)
    model, net = build_model(cfg, dist, None)
    spy = Spy(net, strategy)
    loss4, grads4 = step(net, model, dist, x[dist.rank], y[dist.rank], ACCUM)
    pattern = spy.pattern()
    loss1, grads1 = step(net, model, dist, x[dist.rank].reshape(1, ACCUM * BATCH, SEQ), y[dist.rank].reshape(1, ACCUM * BATCH, SEQ), 1)

    # One process over every rank's tokens in one batch: the mean over all valid targets.
    single = Dist(0, 0, 1, "none", torch.device("cpu"))
    ref_model, _ = build_model(cfg, single, None)
    _, ref_loss = ref_model(x.reshape(-1, SEQ), y.reshape(-1, SEQ))
    ref_loss.backward()
    ref = full_grads(ref_model)
    report = {"rank": dist.rank, "pattern": pattern, "loss_accum4": loss4, "loss_accum1": loss1, "loss_single": float(ref_loss),
              "grad_diff_accum4_vs_accum1": max_diff(grads4, grads1), "grad_diff_vs_single": max_diff(grads4, ref),
              "valid_per_micro": (y[dist.rank] != IGNORE_INDEX).sum(dim=(1, 2)).tolist()}
    write_report(Path("reports"), dist.rank, report)
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "no-sync" if len(sys.argv) > 2 else False)
