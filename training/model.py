"""A decoder-only transformer built from ``ModelConfig``.

Llama-style by default (RMSNorm, RoPE, SwiGLU, no biases) with module names chosen so a
checkpoint maps one to one onto Hugging Face ``LlamaForCausalLM`` (``q_proj``, ``gate_proj``,
``input_layernorm``...); GELU MLPs, LayerNorm, learned positions, GQA/MQA and PaLM-style
parallel blocks are switches of the same classes. Rotary embeddings use the half-split
(``rotate_half``) convention, which is what HF applies to unpermuted weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from training.attention import Attention, KVCache, LayerKV, rope_tables
from training.complex_attention import ComplexAttention
from training.config import ModelConfig
from training.loss import linear_cross_entropy
from training.mlp import MLP
from training.moe import MoE, aux_loss, inactive_parameters


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm.type == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm.eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm.eps, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm block; with ``parallel_layers`` attention and MLP read the same normed input (PaLM)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_layers
        self.input_layernorm = _norm(cfg)
        self.self_attn = ComplexAttention(cfg) if cfg.attention.type == "complex" else Attention(cfg)
        if not self.parallel:
            self.post_attention_layernorm = _norm(cfg)
        if cfg.ffn.type == "moe":
            self.mlp: nn.Module = MoE(cfg)
        else:
            self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | BlockMask | None = None, kv: LayerKV | None = None) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.parallel:
            return x + self.resid_dropout(self.self_attn(h, rope, mask, kv) + self.mlp(h))
        x = x + self.resid_dropout(self.self_attn(h, rope, mask, kv))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """Embeddings, ``num_layers`` blocks, final norm and head.

    Construction allocates but does not initialise weights when built under ``torch.device("meta")``:
    a 4B model is then built, wrapped and sharded without any rank holding it whole, and
    :meth:`init_weights` fills each rank's part on its own device (see ``training/parallelize.py``).
    Activation checkpointing, compilation and sharding are applied from outside, per block, so this
    forward stays the plain loop a reader expects.
    """

    liger_loss = False  # the training loss through liger-kernel on CUDA (``loss_kernel: liger``; training/loss.py)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positional.type == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_load_state_dict_pre_hook(_fill_tied_head)
        if cfg.positional.type == "rope":
            self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the head with the input embedding (again after ``to_empty``, which unties them)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 init: N(0, std), residual projections scaled by 1/sqrt(2 * layers) to keep the stream's variance flat.

        Each tensor draws from a generator seeded by (seed, its index), so the weights are the same
        whether the model is whole or sharded over any number of ranks (:func:`fill_parameter`
        writes only this rank's shard), and on every device type the same for the same seed.
        """
        std = self.cfg.init_std
        index = 0
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if isinstance(module, nn.Linear) and self.cfg.tie_embeddings and module is self.lm_head:
                    continue  # the tied head is the embedding, initialised once
                scale = std / math.sqrt(2 * self.cfg.num_layers) if getattr(module, "residual_projection", False) else std
                fill_parameter(module.weight, lambda t, g, s=scale: t.normal_(0.0, s, generator=g), seed, index)
                index += 1
                if getattr(module, "bias", None) is not None:
                    fill_parameter(module.bias, lambda t, g: t.zero_(), seed, index)
                    index += 1
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                if module.weight is not None:
                    fill_parameter(module.weight, lambda t, g: t.fill_(1.0), seed, index)
                if getattr(module, "bias", None) is not None:
                    fill_parameter(module.bias, lambda t, g: t.zero_(), seed, index)
        self.reset_rope()

    def reset_rope(self) -> None:
        """Compute the rotary tables on the buffers' device (after ``to_empty`` they hold garbage)."""
        if self.cfg.positional.type == "rope":
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.positional.theta, self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(logits, None)`` without targets (sampling, scoring); ``(None, loss)`` with them: the
        training loss never builds the full logits (see training/loss.py), so none are returned.
        Targets equal to -100 are ignored (masked fine-tuning).

        ``doc_ids`` (B, T) marks packed examples: a token attends only within its own example and
        positions restart at each one, so a packed row computes what its examples would alone. The
        mask is built once here and shared by every layer (see :func:`attention_impl`).
        ``cache`` continues from the positions already in it (incremental decoding).
        """
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=idx.device)
        mask = None
        if doc_ids is not None:
            positions = document_positions(doc_ids)
            flex = attention_impl(self.cfg, doc_ids.device, self.training) == "flex"
            mask = document_block_mask(doc_ids) if flex else document_mask(doc_ids)
        elif cache is not None and start > 0 and T > 1:  # a chunk after a cached prefix: causal over both
            mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(start)[None, None]
        x = self.embed_tokens(idx)
        rope = None
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        else:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
            if rope[0].dim() == 3:  # per-row positions (B, T, D): broadcast over heads
                rope = (rope[0].unsqueeze(1), rope[1].unsqueeze(1))
        x = self.dropout(x)
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length += T
        logits, loss = self.output(x, targets)
        if loss is not None and self.training and self.cfg.ffn.type == "moe":
            loss = loss + aux_loss(self)  # router load-balancing and z-loss: trained, not evaluated
        return logits, loss

    def output(self, x: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Final norm, head and loss: a method of its own so it is compiled apart from the blocks."""
        h = self.norm(x)
        if targets is None:
            return self.lm_head(h), None
        # The loss without the (B*T, vocab) logits: chunked (or liger's fused kernel on CUDA).
        return None, linear_cross_entropy(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                          use_liger=self.liger_loss)


def _fill_tied_head(module: Transformer, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints store a tied head once (as ``embed_tokens.weight``): fill ``lm_head.weight`` from it,
    so ``model.load_state_dict(load_file("best.safetensors"))`` works as plain torch code expects (seed 003)."""
    head, embed = f"{prefix}lm_head.weight", f"{prefix}embed_tokens.weight"
    if module.cfg.tie_embeddings and head not in state_dict and embed in state_dict:
        state_dict[head] = state_dict[embed]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its example: 0 where ``doc_ids`` changes along the row."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal and within the same example (a block-diagonal causal mask)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def attention_impl(cfg: ModelConfig, device: torch.device, training: bool) -> str:
    """``flex`` or ``sdpa`` for packed examples, from ``model.attention.impl``.

    ``auto`` takes FlexAttention on CUDA, where the compiled kernel skips the blocks outside every
    example (a dense mask makes SDPA leave flash attention and compute all T x T pairs), and SDPA
    elsewhere: torch has no FlexAttention backward on CPU or MPS, and its CPU forward without
    compile materialises the scores as the dense path does. Flex has no dropout, so dropout while
    training needs SDPA.
    """
    dropout = training and cfg.dropout > 0
    if cfg.attention.type == "complex":  # explicit complex scores (training/complex_attention.py): a dense mask
        if cfg.attention.impl == "flex":
            raise ValueError("model.attention.impl: flex cannot compute attention.type complex; use sdpa or auto")
        return "sdpa"
    if cfg.attention.impl == "flex" and dropout:
        raise ValueError(f"model.attention.impl: flex has no attention dropout (model.dropout is {cfg.dropout}); use sdpa or auto")
    if cfg.attention.impl == "auto":
        return "flex" if device.type == "cuda" and not dropout else "sdpa"
    return cfg.attention.impl


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """The :func:`document_mask` as a FlexAttention ``BlockMask``: per 128 x 128 tile, whether it is
    empty, full or partial, so the kernel skips the tiles between examples and never holds T x T.
    Built from a ``mask_mod`` (compiled on CUDA, where the eager build would materialise B x T x T)."""
    B, T = doc_ids.shape

    def same_document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device, _compile=doc_ids.is_cuda)


def fill_parameter(param: torch.Tensor, fill, seed: int, index: int) -> None:
    """Apply ``fill(tensor, generator)`` to ``param`` as if it were whole, writing only the local part.

    A plain tensor is filled in place. A DTensor (an FSDP2 shard) is filled by drawing the full tensor
    on this rank's device, one parameter at a time (peak: the largest single tensor), and keeping the
    local slice, so a sharded init equals the unsharded one bit for bit.
    """
    local = param.to_local() if hasattr(param, "to_local") else param
    gen = torch.Generator(device=local.device)
    gen.manual_seed(seed * 1_000_003 + index)
    if local is param:
        fill(param, gen)
        return
    from torch.distributed.tensor import distribute_tensor

    full = fill(torch.empty(param.shape, dtype=local.dtype, device=local.device), gen)
    local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int, num_params: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 6·L·d·T for causal attention's scores and
    values (llm.c's convention: ``gpt2_estimate_mfu``; PaLM appendix B's 12·L·d·T counts every
    (query, key) pair, which causal attention halves; nanoGPT and torchtitan use 12). Flash
    attention's recomputation in backward is not counted: MFU counts the model's FLOPs, not the
    kernels'.

    N excludes embedding lookups that do no matmul: learned positions, and the input table when untied;
    and for a mixture of experts the experts a token is not routed to (N is the active parameters).
    """
    n = num_params - inactive_parameters(cfg)
    if cfg.positional.type == "learned":
        n -= cfg.max_seq_len * cfg.d_model
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.d_model
    return 6.0 * n + 6.0 * cfg.num_layers * cfg.d_model * seq_len


def build_meta_model(cfg: ModelConfig) -> Transformer:
    """Build on the meta device: shapes and counts for any size at no memory cost."""
    with torch.device("meta"):
        return Transformer(cfg)
