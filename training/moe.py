"""Mixture-of-experts feed-forward: a softmax top-k router over SwiGLU experts, dropless.

Every token goes to its ``top_k`` experts, however uneven the split (no capacity factor, no dropped
tokens). Tokens are sorted by expert so each expert runs one matmul over a contiguous slice: on CUDA
in bf16 all experts run as one ``torch._grouped_mm`` (no host sync, no per-expert launch), elsewhere
a loop over experts (not over tokens). Every expert runs on every step, on an empty slice if no token
chose it, so each expert weight gets a gradient (zeros when unused) and DDP's reducer never waits for
a parameter that was skipped: no ``find_unused_parameters`` scan is needed.

Two auxiliary losses keep the router healthy; the model adds them to its training loss:

- load balancing (Switch Transformer eq. 4, Mixtral): ``E * sum_e f_e * P_e``, where ``f_e`` is the
  fraction of routed slots that went to expert ``e`` and ``P_e`` its mean router probability; 1.0
  when the load is uniform;
- router z-loss (ST-MoE): ``mean(logsumexp(logits)^2)``, which keeps router logits small so the
  softmax stays stable in bf16.

Sequential expert runs (seed 004) train one expert per MoE layer at a time: :func:`freeze_inactive_experts`,
:func:`load_expert_run_start` and :func:`save_expert_run` are the trainer's three hooks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from training.atomic import atomic_path
from training.config import ModelConfig, TrainConfig
from training.mlp import MLP

if TYPE_CHECKING:
    from training.distributed import Dist

_EXPERT_KEY = re.compile(r"(^|\.)mlp\.experts\.(\d+)\.")


class MoE(nn.Module):
    """``router`` (d_model -> num_experts, no bias), ``experts`` (SwiGLU MLPs) and an optional ``shared_expert``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ffn = cfg.ffn
        self.num_experts, self.top_k = ffn.num_experts, ffn.top_k
        self.load_balance_coef, self.z_loss_coef = ffn.load_balance_coef, ffn.z_loss_coef
        self.router = nn.Linear(cfg.d_model, ffn.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(ffn.num_experts))
        self.shared_expert = MLP(cfg) if ffn.shared_expert else None
        self.grouped = not cfg.bias and cfg.d_model % 8 == 0 and cfg.ffn_hidden % 8 == 0  # _grouped_mm's 16-byte strides
        self.aux_loss: torch.Tensor | None = None  # set by each training forward, read by Transformer.forward
        self._stats: list[torch.Tensor] | None = None  # [slots per expert, load-balance sum, z-loss sum, calls]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:  # Mixtral renormalises; with top-1 the raw probability keeps the router in the gradient
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = chosen.flatten()
        counts = torch.zeros(self.num_experts, dtype=flat.dtype, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
        order = flat.argsort(stable=True)
        token = order // self.top_k
        ys = self._run_experts(x[token], counts)
        ys = ys * weights.flatten()[order].unsqueeze(-1).to(ys.dtype)
        out = torch.zeros(x.shape, dtype=ys.dtype, device=x.device).index_add_(0, token, ys)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        if self.training:
            self._add_aux_loss(logits, probs, counts)
        return out.view(shape)

    def _run_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of ``xs`` are sorted by expert, ``counts[e]`` of them for expert ``e``."""
        if xs.is_cuda and self.grouped and _compute_dtype(xs) == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
            return self._grouped_experts(xs.to(torch.bfloat16), counts)
        if xs.is_meta:  # shapes only (memory plan): assume an even split
            n = xs.shape[0]
            splits = [n // self.num_experts + (e < n % self.num_experts) for e in range(self.num_experts)]
        else:
            splits = counts.tolist()
        return torch.cat([expert(chunk) for expert, chunk in zip(self.experts, xs.split(splits))])

    def _grouped_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)

        def stacked(name: str) -> torch.Tensor:  # (E, in, out) views of the (out, in) Linear weights
            return torch.stack([getattr(e, name).weight for e in self.experts]).to(torch.bfloat16).transpose(-2, -1)

        gate = torch._grouped_mm(xs, stacked("gate_proj"), offs=offsets)
        up = torch._grouped_mm(xs, stacked("up_proj"), offs=offsets)
        return torch._grouped_mm(F.silu(gate) * up, stacked("down_proj"), offs=offsets)

    def _add_aux_loss(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> None:
        fraction = counts.to(probs.dtype) / counts.sum()
        balance = self.num_experts * (fraction * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        self.aux_loss = self.load_balance_coef * balance + self.z_loss_coef * z
        update = [counts.detach().float(), balance.detach(), z.detach(), torch.ones((), device=counts.device)]
        self._stats = update if self._stats is None else [a + b for a, b in zip(self._stats, update)]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses of the last training forward, over all MoE layers (None for a dense model)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def collect_stats(model: nn.Module) -> dict[str, float]:
    """Router statistics since the last call on this rank, then reset; empty for a dense model.

    ``moe_balance_loss`` (1.0 at a uniform load) and ``moe_z_loss`` are means over layers and
    forwards; ``moe_load_<e>`` is expert ``e``'s share of the routed slots over all layers;
    ``moe_load_max_over_mean`` is the busiest expert's load over the mean in the worst layer
    (1.0 = even). Costs one device sync, so call it at log steps only.
    """
    layers = moe_layers(model)
    stats = [m._stats for m in layers if m._stats is not None]
    for m in layers:
        m._stats = None
    if not stats:
        return {}
    slots = torch.stack([s[0] for s in stats])  # (layers, experts)
    balance, z, calls = (torch.stack([s[i] for s in stats]).sum() for i in (1, 2, 3))
    worst = (slots.max(dim=1).values / slots.mean(dim=1)).max()
    share = (slots.sum(0) / slots.sum()).tolist()
    out = {"moe_balance_loss": float(balance / calls), "moe_z_loss": float(z / calls), "moe_load_max_over_mean": float(worst)}
    out.update({f"moe_load_{e}": v for e, v in enumerate(share)})
    return out


def expert_parameters(cfg: ModelConfig) -> int:
    """Parameters of one routed expert in one layer."""
    bias = (2 * cfg.ffn_hidden + cfg.d_model) if cfg.bias else 0
    return 3 * cfg.d_model * cfg.ffn_hidden + bias


def inactive_parameters(cfg: ModelConfig) -> int:
    """Parameters a token does not touch: the experts it is not routed to (0 for a dense model)."""
    if cfg.ffn.type != "moe":
        return 0
    return cfg.num_layers * (cfg.ffn.num_experts - cfg.ffn.top_k) * expert_parameters(cfg)


def describe_parameters(cfg: ModelConfig, total: int) -> str:
    """``"174.16M parameters"``, or for a mixture of experts ``"229.34M parameters (97.19M active per token)"``."""
    active = total - inactive_parameters(cfg)
    return f"{total / 1e6:.2f}M parameters" + (f" ({active / 1e6:.2f}M active per token)" if active != total else "")


def moe_hf_compatible(cfg: ModelConfig) -> str | None:
    """Why this config cannot be exported as ``MixtralForCausalLM``, or None when it can (or is dense)."""
    if cfg.ffn.type != "moe":
        return None
    reasons = {
        "ffn.shared_expert: Mixtral has no shared expert": cfg.ffn.shared_expert,
        "ffn.top_k: 1 scales by the raw router probability; Mixtral renormalises the top-k weights to 1": cfg.ffn.top_k == 1,
        "bias: Mixtral's linear layers have no biases": cfg.bias,
        "norm.type: Mixtral uses RMSNorm": cfg.norm.type != "rmsnorm",
        "positional.type: Mixtral uses rotary embeddings": cfg.positional.type != "rope",
        "parallel_layers: Mixtral blocks are sequential": cfg.parallel_layers,
    }
    found = [reason for reason, bad in reasons.items() if bad]
    return "; ".join(found) if found else None


# --- sequential expert runs ------------------------------------------------------------------------

def expert_index(name: str) -> int | None:
    """The expert a parameter name belongs to (``layers.3.mlp.experts.2.up_proj.weight`` -> 2), else None."""
    match = _EXPERT_KEY.search(name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""))
    return int(match.group(2)) if match else None


def freeze_inactive_experts(model: nn.Module, active: int | None) -> int:
    """Freeze every routed expert but ``active`` (shared weights, router and shared expert train); returns the count frozen.

    Call it before DDP wraps the model (DDP registers only parameters that require grad) and before
    the optimizer is built (which takes only parameters that require grad), so the frozen experts
    have no gradients, no optimizer state and no weight decay: their tensors stay bitwise unchanged.
    """
    if active is None:
        return 0
    frozen = 0
    for name, param in model.named_parameters():
        index = expert_index(name)
        if index is not None and index != active:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def _expert_path(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"expert_{index}.safetensors"


def load_expert_run_start(net: nn.Module, cfg: TrainConfig, dist: "Dist", info: Callable[[str], None]) -> None:
    """Start a fresh expert run from ``DIR/shared.safetensors`` (the latest shared weights and router) and every ``DIR/expert_<i>``.

    The model's own full state dict (gathered on every rank, so the same code serves one process,
    DDP and FSDP) is overlaid with the saved tensors and loaded back through ``dist``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    directory = Path(cfg.expert_checkpoint_dir or "")
    files = [directory / "shared.safetensors"] + sorted(directory.glob("expert_*.safetensors"))
    files = [f for f in files if f.is_file()]
    if not files:
        info(f"expert run {cfg.active_expert}: no shared or expert weights in {directory} yet: starting from the initialisation")
        return
    tied = cfg.model.tie_embeddings
    weights = {k: v.detach().clone() for k, v in get_model_state_dict(net, options=StateDictOptions(full_state_dict=True)).items()}
    if tied:
        weights.pop("lm_head.weight", None)
    for path in files:
        saved = _read_weights(path)
        unknown = sorted(set(saved) - set(weights))
        if unknown:
            raise ValueError(f"{path}: weights do not match the model (unexpected {unknown[:3]})")
        for key, value in saved.items():
            if value.shape != weights[key].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model {tuple(weights[key].shape)}")
            weights[key] = value.to(weights[key].device, weights[key].dtype)
    dist.load_model_state(net, weights, tied)
    info(f"expert run {cfg.active_expert}: loaded {', '.join(f.name for f in files)} from {directory}")


def finish_expert_run(net: nn.Module, cfg: TrainConfig, dist: "Dist", info: Callable[[str], None]) -> None:
    """At the end of an expert run (every rank calls it: FSDP gathers the weights), rank 0 writes the expert and shared files."""
    weights = dist.model_state(net, cfg.model.tie_embeddings)
    if dist.is_main:
        paths = save_expert_run(weights, cfg)
        info(f"expert run {cfg.active_expert}: wrote {', '.join(str(p) for p in paths)}")
    dist.slow_barrier()


def save_expert_run(weights: dict[str, torch.Tensor], cfg: TrainConfig) -> list[Path]:
    """Write ``DIR/expert_<i>.safetensors`` (expert i of every layer) and ``DIR/shared.safetensors`` (all but the experts).

    Atomic: a run killed while writing leaves the previous files whole.
    """
    directory = Path(cfg.expert_checkpoint_dir or "")
    active = cfg.active_expert
    parts = {
        _expert_path(directory, active): {k: v for k, v in weights.items() if expert_index(k) == active},
        directory / "shared.safetensors": {k: v for k, v in weights.items() if expert_index(k) is None},
    }
    for path, tensors in parts.items():
        with atomic_path(path) as tmp:
            safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                        metadata={"active_expert": str(active)})
    return list(parts)


def _read_weights(path: Path) -> dict[str, Any]:
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors' own error types for truncated or foreign files
        raise ValueError(f"{path}: unreadable expert weights ({exc})") from None
