"""Sampling with a KV cache: temperature, top-k, top-p, a seed; greedy at temperature 0.

The prompt is run once to fill :class:`KVCache`, then each new token costs one position of
attention over the cache instead of a forward over the whole prefix: the uncached loop
(:func:`generate_uncached`, kept as the reference the cache is tested and benchmarked against)
does O(T) more work per token. Both pick tokens with the same function, so greedy decoding gives
the same tokens either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.model import KVCache, Transformer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    eos_id: int | None = None  # stop after producing it

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k {self.top_k}: must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: must be >= 0")


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from the last position's logits (1-D, vocab)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def _budget(model: Transformer, prompt: list[int], params: SamplingParams) -> tuple[list[int], int]:
    """(the prompt, cut from the left to leave room, and how many tokens fit after it in max_seq_len)."""
    if not prompt:
        raise ValueError("the prompt is empty (at least one token is needed to condition on)")
    limit = model.cfg.max_seq_len
    keep = max(1, limit - params.max_new_tokens)
    prompt = prompt[-keep:]
    return prompt, min(params.max_new_tokens, limit - len(prompt))


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], params: SamplingParams) -> list[int]:
    """New token ids after ``prompt`` (stops after ``eos_id`` or at ``max_new_tokens``), with a KV cache."""
    prompt, budget = _budget(model, prompt, params)
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    cache = KVCache(model.cfg.num_layers, len(prompt) + budget)
    logits, _ = model(torch.tensor([prompt], device=device), cache=cache)
    out: list[int] = []
    while len(out) < budget:
        token = pick(logits[0, -1].cpu(), params, generator)
        out.append(token)
        if token == params.eos_id or len(out) == budget:
            break
        logits, _ = model(torch.tensor([[token]], device=device), cache=cache)
    return out


@torch.no_grad()
def generate_uncached(model: Transformer, prompt: list[int], params: SamplingParams) -> list[int]:
    """The same tokens as :func:`generate`, recomputing the whole prefix for every new token (the baseline)."""
    prompt, budget = _budget(model, prompt, params)
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    ids = list(prompt)
    while len(ids) - len(prompt) < budget:
        logits, _ = model(torch.tensor([ids], device=device))
        token = pick(logits[0, -1].cpu(), params, generator)
        ids.append(token)
        if token == params.eos_id:
            break
    return ids[len(prompt):]
