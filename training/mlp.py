"""The feed-forward block: SwiGLU (Llama) or GELU (GPT-2); also one routed expert of a mixture.

Its own module because both the dense block (``training.model``) and the experts
(``training.moe``) build on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ModelConfig


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_hidden
        self.swiglu = cfg.ffn.type in ("swiglu", "moe")  # MoE experts are SwiGLU MLPs of width expert_hidden_size
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.down_proj.residual_projection = True  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
