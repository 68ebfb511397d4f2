"""Turn a model built on the meta device into the one a run trains: checkpointed, compiled, sharded, initialised.

The order is torchtitan's, and it matters: per block, the activation-checkpoint wrapper, then
``block.compile()``, then (FSDP2) ``fully_shard(block)``; the final norm, head and loss
(``Transformer.output``) are compiled on their own, and the root is never compiled. Compiling the
root instead breaks on FSDP's hooks in the loop over blocks and ends up compiling nothing, and on
DDP it traces DDP's own wrapper (graph breaks every step). Per block, every block runs compiled
under every strategy, one graph serves all blocks (compile time does not grow with depth), and
DDP's buckets overlap with the backward of the blocks still running.

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


def apply_activation_checkpointing(model: Transformer, every: int = 1) -> None:
    """Wrap blocks 0, every, 2*every, ... so their activations are recomputed in backward instead of
    kept (selective with ``every`` > 1: memory for a fraction of the recompute; state-dict keys unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        if i % every == 0:
            model.layers[i] = checkpoint_wrapper(block)


def compile_per_block(model: Transformer, backend: str) -> None:
    """Compile each block in place, and the output (norm, head, loss) on its own: the FSDP way."""
    for block in model.layers:
        block.compile(backend=backend)
    model.output = torch.compile(model.output, backend=backend)  # type: ignore[method-assign]


def build_model(cfg: TrainConfig, dist: Dist, param_dtype: torch.dtype | None) -> tuple[Transformer, nn.Module]:
    """(model, net): ``model`` holds the parameters by name, ``net`` is what the training step calls."""
    model = build_meta_model(cfg.model)
    model.liger_loss = cfg.loss_kernel == "liger"
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, cfg.ac_every)
    if cfg.compile_model:
        torch._dynamo.utils.counters.clear()  # the compile report counts this model's graphs only
        compile_per_block(model, cfg.compile_backend)
    if dist.strategy == "fsdp":
        offload = cfg.optimizer.cpu_offload
        dist.shard(model, param_dtype, cpu_offload=offload)
        model.to_empty(device="cpu" if offload else dist.device)  # offloaded shards live on the host (torchtitan's init_device)
        if offload:  # the rotary tables are read by every forward on the GPU: only they move there
            for name, buffer in list(model.named_buffers(recurse=False)):
                setattr(model, name, buffer.to(dist.device))
        if cfg.model.tie_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
            raise RuntimeError("FSDP lost the tie between lm_head and embed_tokens during to_empty")
        model.init_weights(cfg.seed)
        freeze_inactive_experts(model, cfg.active_expert)
        return model, model
    model.to_empty(device=dist.device)
    model.tie_weights()
    model.init_weights(cfg.seed)
    freeze_inactive_experts(model, cfg.active_expert)  # before DDP registers the parameters that need gradients
    return model, dist.replicate(model)
