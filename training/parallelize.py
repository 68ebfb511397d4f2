"""Turn a model built on the meta device into the one a run trains: checkpointed, compiled, sharded, initialised.

The order is torchtitan's, and it matters:

- **FSDP2**: per block, activation-checkpoint wrapper, then ``block.compile()``, then ``fully_shard(block)``;
  the final norm, head and loss (``Transformer.output``) are compiled on their own, and the root is
  sharded but never compiled. ``torch.compile`` around a sharded root breaks on FSDP's hooks in the
  loop over blocks and ends up compiling nothing.
- **DDP / one process**: the whole model is compiled (one graph, or DDP's per-bucket graphs).

The model is built with no storage (meta device), wrapped and sharded, then ``to_empty`` gives each
rank storage for its own shard only, and :meth:`Transformer.init_weights` fills it. No rank ever
holds the whole model, so a 4B run on 8 GPUs needs a shard of host RAM per rank, not 16 GB each.
"""

from __future__ import annotations

import torch
from torch import nn

from training.distributed import Dist
from training.model import Transformer, build_meta_model
from training.moe import freeze_inactive_experts
from training.config import TrainConfig


def apply_activation_checkpointing(model: Transformer) -> None:
    """Wrap every block so its activations are recomputed in backward instead of kept (state-dict keys unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)


def compile_per_block(model: Transformer) -> None:
    """Compile each block in place, and the output (norm, head, loss) on its own: the FSDP way."""
    for block in model.layers:
        block.compile()
    model.output = torch.compile(model.output)  # type: ignore[method-assign]


def build_model(cfg: TrainConfig, dist: Dist, param_dtype: torch.dtype | None) -> tuple[Transformer, nn.Module]:
    """(model, net): ``model`` holds the parameters by name, ``net`` is what the training step calls."""
    model = build_meta_model(cfg.model)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if dist.strategy == "fsdp":
        if cfg.compile_model:
            compile_per_block(model)
        dist.shard(model, param_dtype)
        model.to_empty(device=dist.device)
        if cfg.model.tie_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
            raise RuntimeError("FSDP lost the tie between lm_head and embed_tokens during to_empty")
        model.init_weights(cfg.seed)
        freeze_inactive_experts(model, cfg.active_expert)
        return model, model
    model.to_empty(device=dist.device)
    model.tie_weights()
    model.init_weights(cfg.seed)
    freeze_inactive_experts(model, cfg.active_expert)  # before DDP registers the parameters that need gradients
    net = dist.replicate(model)
    if cfg.compile_model:
        net = torch.compile(net)
    return model, net
