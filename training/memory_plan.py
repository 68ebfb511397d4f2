"""Peak GPU memory of one training step, per rank, planned without a GPU.

``plan(cfg, world, strategy)`` returns the bytes each rank needs and what they are for, so that a
config's micro-batch, accumulation and activation checkpointing are chosen from a budget (and the
GPU check compares ``torch.cuda.max_memory_allocated`` against it). ``bench/memory_plan.py``
prints the tables in docs/performance.md.

What is counted, per rank:

- model state: float32 master weights, gradients and the two AdamW moments (16 bytes/parameter),
  whole under DDP (whose gradients *are* its buckets: ``gradient_as_bucket_view=True``; without
  it the buckets are a second float32 copy) and divided by the ranks under FSDP2;
- FSDP's accumulation gradients, only with ``distributed.fsdp_no_sync`` (off by default): with
  ``set_requires_gradient_sync(False)`` around every micro-step but the last, FSDP2 keeps each
  parameter's *unsharded* gradient, upcast to the float32 reduce dtype, on every rank until the last
  micro-step reduce-scatters it: 4 bytes per parameter of the whole model, however many ranks
  (tests/test_accumulation.py spies on FSDP to show when it reduces);
- bf16 weight copies: autocast's cast of every weight a matmul uses (DDP and one GPU), or the
  parameters FSDP all-gathers (the root's embedding all step, two blocks at a time: the one
  computing and the one prefetched) plus one block's unsharded gradients in bf16 and float32;
- activations, *measured*: one forward of the real model on the meta device with
  ``saved_tensors_hooks`` adding up what autograd keeps for backward (parameters excluded). The
  meta device would run SDPA's math path and save T x T matrices that flash attention never
  makes, so SDPA is replaced there by a function that saves what the flash kernel saves (q, k, v,
  the output and a float32 logsumexp); no tensor is dropped by its shape. Under DDP the forward
  runs with float32 weights and autocast's rule applied to every matmul (inputs cast to bf16), so
  the float32 residual stream and the per-matmul bf16 casts are counted as on a GPU; under FSDP
  with bf16 parameters. With activation checkpointing a checkpointed block keeps only its input,
  and backward recomputes one block at a time (its full activations, once);
- the loss's transient: one chunk of logits (matmul output, its float32 copy, the bf16
  gradient) and one chunk's weight gradient, from training/loss.py's chunking.

Not counted: the CUDA context and NCCL buffers (outside ``max_memory_allocated``), allocator
fragmentation, and what ``torch.compile`` saves instead (its partitioner usually saves less).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from training import loss as loss_module
from training.config import ModelConfig, TrainConfig
from training.model import build_meta_model, count_parameters

Mode = Literal["autocast", "bf16", "fp32"]
_LOW = torch.bfloat16


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Stands in for ``F.scaled_dot_product_attention`` (looked up there by the model at each call): the
    flash kernel's own op, whose meta kernel and derivative make autograd save what CUDA's flash
    attention saves (q, k, v, the output, a float32 logsumexp, the RNG state), never a T x T matrix
    (the meta device would otherwise take SDPA's math path). Under GQA, k and v are expanded first."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


class _FusedRMSNorm(torch.autograd.Function):
    """What CUDA's fused ``rms_norm`` (``aten._fused_rms_norm``, which ``nn.RMSNorm`` reaches through
    ``F.rms_norm`` on a GPU) saves for backward: its input, its weight and a float32 rstd per row.
    On the meta device and the CPU ``rms_norm`` is composite and saves two more float32 copies of
    the input (0.4 of runpod_4b's 1.36 GB per block); tests/gpu checks the CUDA side."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight, x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, _ = ctx.saved_tensors
        return torch.zeros_like(x), None if weight is None else torch.zeros_like(weight), None


def _fused_rms_norm(x, normalized_shape, weight=None, eps=None):
    """Stands in for ``F.rms_norm`` (looked up there by ``nn.RMSNorm`` at each call)."""
    return _FusedRMSNorm.apply(x, weight, eps)


class _AutocastOnMeta(TorchFunctionMode):
    """CUDA autocast's rule for the ops this model uses, on a device autocast does not cover:
    matmul inputs in float32 are cast to bf16, and a weight's cast is cached for the forward."""

    MATMULS = {F.linear, torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm}

    def __init__(self) -> None:
        super().__init__()
        self.casts: dict[int, torch.Tensor] = {}
        self.cast_ids: set[int] = set()

    def _cast(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            return t
        if isinstance(t, torch.nn.Parameter):
            if id(t) not in self.casts:
                self.casts[id(t)] = t.to(_LOW)
                self.cast_ids.add(id(self.casts[id(t)]))
            return self.casts[id(t)]
        return t.to(_LOW)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.MATMULS:
            args = tuple(self._cast(a) for a in args)
            kwargs = {k: self._cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _saved_bytes(module: torch.nn.Module, inputs: tuple, mode: Mode, exclude: set[int], fused_norm: bool = True) -> tuple[int, int]:
    """(bytes autograd saves in one forward of ``module``, bytes of autocast's weight casts); with
    ``fused_norm`` RMSNorm saves what CUDA's fused kernel saves, else what the composite one does."""
    seen: dict[int, torch.Tensor] = {}
    autocast = _AutocastOnMeta() if mode == "autocast" else None

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in exclude and id(base) not in seen and (autocast is None or id(base) not in autocast.cast_ids):
            seen[id(base)] = base
        return t

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", _flash_sdpa))
        if fused_norm:
            stack.enter_context(mock.patch.object(F, "rms_norm", _fused_rms_norm))
        if autocast is not None:  # the loss asks autocast for its matmul dtype
            stack.enter_context(mock.patch.object(loss_module, "compute_dtype", lambda h, w: _LOW))
            stack.enter_context(autocast)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        module(*inputs)
    total = sum(t.untyped_storage().nbytes() for t in seen.values())
    casts = sum(c.untyped_storage().nbytes() for c in autocast.casts.values()) if autocast else 0
    return total, casts


@dataclass(frozen=True)
class ActivationProfile:
    """Measured bytes of one forward at (batch, seq_len) under one precision mode."""

    block: int          # what one block saves for backward
    block_input: int    # what a checkpointed block keeps instead (its input)
    rest: int           # embedding, final norm and the loss (its saved gradients)
    weight_casts: int   # autocast's bf16 copies of the weights (0 unless mode == "autocast")


@functools.lru_cache(maxsize=32)
def _profile(model_json: str, batch: int, seq_len: int, mode: Mode, fused_norm: bool = True) -> ActivationProfile:
    mcfg = ModelConfig.model_validate_json(model_json)
    model = build_meta_model(mcfg)
    if mode == "bf16":
        model = model.to(_LOW)
    model.train()
    exclude = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    idx = torch.zeros((batch, seq_len), dtype=torch.long, device="meta")
    total, casts = _saved_bytes(model, (idx, idx), mode, exclude, fused_norm)
    residual = _LOW if mode == "bf16" else torch.float32  # autocast keeps the residual stream in float32
    x = torch.empty((batch, seq_len, mcfg.d_model), dtype=residual, device="meta", requires_grad=True)
    rope = (model.rope_cos[:seq_len], model.rope_sin[:seq_len]) if mcfg.positional.type == "rope" else None
    block, _ = _saved_bytes(model.layers[0], (x, rope), mode, exclude, fused_norm)
    return ActivationProfile(block, x.numel() * x.element_size(), total - mcfg.num_layers * block, casts)


def activation_profile(cfg: TrainConfig, mode: Mode, fused_norm: bool = True) -> ActivationProfile:
    """Measured on the meta device (cached: the 4B model's forward takes a second or two); ``fused_norm``
    False counts RMSNorm as the CPU's composite implementation saves it."""
    return _profile(cfg.model.model_dump_json(), cfg.batch_size, cfg.seq_len, mode, fused_norm)


def checkpointed_blocks(num_layers: int, every: int) -> int:
    """Blocks checkpointed when every ``every``-th one is (blocks 0, every, 2*every, ...)."""
    return math.ceil(num_layers / every)


@dataclass
class MemoryPlan:
    strategy: str
    world: int
    params: int
    activation_checkpointing: bool
    ac_every: int
    terms: dict[str, int] = field(default_factory=dict)       # held through the step
    transients: dict[str, int] = field(default_factory=dict)  # peaks that do not coincide: the largest counts

    @property
    def peak_bytes(self) -> int:
        return sum(self.terms.values()) + max(self.transients.values(), default=0)

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "world": self.world, "params": self.params,
                "activation_checkpointing": self.activation_checkpointing, "ac_every": self.ac_every,
                "terms": self.terms, "transients": self.transients, "peak_bytes": self.peak_bytes}


def _resolve_strategy(cfg: TrainConfig, world: int, strategy: str | None) -> str:
    strategy = strategy or cfg.distributed.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy not in ("none", "ddp", "fsdp"):
        raise ValueError(f"strategy: expected none, ddp or fsdp, got {strategy!r}")
    return strategy


def plan(cfg: TrainConfig, world: int = 1, strategy: str | None = None, *, activation_checkpointing: bool | None = None,
         ac_every: int | None = None, bucket_view: bool = True) -> MemoryPlan:
    """Peak bytes per rank of a training step of ``cfg`` on ``world`` ranks (bf16 compute).

    ``strategy`` defaults to the config's (``auto``: DDP on several ranks, none on one);
    ``activation_checkpointing`` and ``ac_every`` default to the config's. ``bucket_view``:
    whether DDP's gradients are views of its buckets (the trainer's setting) or a second copy.
    """
    strategy = _resolve_strategy(cfg, world, strategy)
    ac = cfg.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    every = (ac_every or cfg.ac_every) if ac else 0
    model = build_meta_model(cfg.model)
    n = count_parameters(model)
    mc = cfg.model
    fsdp = strategy == "fsdp"
    shard = world if fsdp else 1
    low = 2 if cfg.dtype != "float32" else 4
    mode: Mode = "fp32" if cfg.dtype == "float32" else ("bf16" if fsdp else "autocast")
    prof = activation_profile(cfg, mode)

    checkpointed = checkpointed_blocks(mc.num_layers, every) if ac else 0
    held_acts = prof.rest + checkpointed * prof.block_input + (mc.num_layers - checkpointed) * prof.block
    terms = {"parameters": 4 * n // shard, "gradients": 4 * n // shard, "adamw": 8 * n // shard}
    if strategy == "ddp" and not bucket_view:
        terms["ddp_buckets"] = 4 * n
    if fsdp and cfg.gradient_accumulation_steps > 1 and cfg.distributed.fsdp_no_sync:
        terms["fsdp_accumulation_grads"] = 4 * n
    block_params = sum(p.numel() for p in model.layers[0].parameters())
    root_params = n - mc.num_layers * block_params
    if fsdp:
        terms["weight_copies"] = low * root_params + 2 * low * block_params  # the root all step; a block and the prefetched next
    else:
        terms["weight_copies"] = prof.weight_casts
    terms["activations"] = held_acts

    rows = cfg.batch_size * cfg.seq_len
    chunk = loss_module.default_chunk_rows(rows, mc.vocab_size, mc.d_model)
    weight_cast = mc.vocab_size * mc.d_model * low if mode == "autocast" else 0
    transients = {"loss_chunk": chunk * mc.vocab_size * (low + 4 + low) + mc.vocab_size * mc.d_model * low + weight_cast}
    if ac:
        transients["recompute_block"] = prof.block
    if fsdp:  # one block's unsharded gradients: bf16 from backward, float32 for accumulation or reduce-scatter
        transients["fsdp_block_grads"] = (low + 4) * block_params
    return MemoryPlan(strategy, world, n, ac, every, terms, transients)


def format_plan(p: MemoryPlan) -> str:
    """The plan's breakdown on one line: what is held through the step, then the transients, of which
    only the largest counts."""
    held = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(p.terms.items(), key=lambda kv: -kv[1]))
    passing = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(p.transients.items(), key=lambda kv: -kv[1]))
    return (f"planned peak {p.peak_bytes / 1e9:.1f} GB per GPU ({p.strategy} x{p.world}): held {held}; "
            f"largest of the transients {passing}")


BUDGET_FRACTION = 0.8  # of a GPU's memory: the rest for the CUDA context, NCCL buffers and fragmentation (64 of 80 GB)


def memory_budget(cfg: TrainConfig, device: torch.device) -> int:
    """Bytes per GPU a plan must fit: ``memory_budget_gb``, else 80% of this GPU's memory."""
    if cfg.memory_budget_gb is not None:
        return int(cfg.memory_budget_gb * 1e9)
    if device.type != "cuda":
        raise ValueError(f"auto_micro_batch: set memory_budget_gb (no GPU memory size to plan against on {device})")
    return int(BUDGET_FRACTION * torch.cuda.get_device_properties(device).total_memory)


def choose_micro_batch(cfg: TrainConfig, world: int, strategy: str, budget: int) -> tuple[TrainConfig, MemoryPlan]:
    """``cfg`` with the largest micro-batch whose plan fits ``budget`` bytes, among the divisors of its
    sequences per rank per step (``batch_size x gradient_accumulation_steps``, kept: the accumulation
    takes the rest, so the optimisation is unchanged). Plans grow with the micro-batch: a binary search."""
    per_rank = cfg.batch_size * cfg.gradient_accumulation_steps
    sizes = [b for b in range(1, per_rank + 1) if per_rank % b == 0]
    trial = lambda b: cfg.model_copy(update={"batch_size": b, "gradient_accumulation_steps": per_rank // b})  # noqa: E731
    lo, hi, best = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        p = plan(trial(sizes[mid]), world, strategy)
        if p.peak_bytes <= budget:
            best, lo = (sizes[mid], p), mid + 1
        else:
            hi = mid - 1
    if best is None:
        smallest = plan(trial(1), world, strategy)
        raise ValueError(f"auto_micro_batch: even micro-batch 1 plans {smallest.peak_bytes / 1e9:.1f} GB per GPU, over the "
                         f"{budget / 1e9:.1f} GB budget (activation_checkpointing, more ranks under fsdp, or memory_budget_gb)")
    return trial(best[0]), best[1]


def plan_line(cfg: TrainConfig, world: int, strategy: str | None, device: torch.device) -> tuple[TrainConfig, str]:
    """``cfg`` as it will run (with ``auto_micro_batch``, the chosen micro-batch) and the plan on one
    line. The trainer logs it; ``train --dry-run`` prints the same, so the choice is seen before a pod
    is paid for. Raises ValueError when auto_micro_batch has no budget to plan against."""
    if not cfg.auto_micro_batch:
        return cfg, format_plan(plan(cfg, world, strategy))
    budget = memory_budget(cfg, device)
    chosen, p = choose_micro_batch(cfg, world, strategy or cfg.distributed.strategy, budget)
    return chosen, (f"auto_micro_batch: micro-batch {chosen.batch_size} x {chosen.gradient_accumulation_steps} accumulation "
                    f"(budget {budget / 1e9:.1f} GB) | {format_plan(p)}")
