"""Talk to a fine-tuned checkpoint through the chat template: the reply to a conversation, decoded
greedily (or sampled) until the model closes its message with ``<|end|>``."""

from __future__ import annotations

import torch

from training.model import KVCache, Transformer
from training.sft.records import Message
from training.sft.template import ChatTokenizer


@torch.no_grad()
def reply_ids(model: Transformer, chat: ChatTokenizer, messages: list[Message], max_new_tokens: int = 128,
              temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """The ids the model writes after ``messages`` + ``<|assistant|>``, without the closing ``<|end|>``.

    Incremental decoding with a KV cache: one forward over the prompt, then one token at a time.
    ``temperature`` 0 is greedy (what the accuracy checks use).
    """
    prompt, _ = chat.encode(messages, add_generation_prompt=True)
    capacity = min(model.cfg.max_seq_len, len(prompt) + max_new_tokens)
    prompt = prompt[-(capacity - 1):] if len(prompt) >= capacity else prompt
    device = next(model.parameters()).device
    cache = KVCache(model.cfg.num_layers, capacity)
    logits, _ = model(torch.tensor([prompt], device=device), cache=cache)
    out: list[int] = []
    while True:
        last = logits[0, -1].float()
        if temperature > 0:
            last = last / temperature
            if top_k:
                last[last < torch.topk(last, min(top_k, last.numel())).values[-1]] = float("-inf")
            token = int(torch.multinomial(torch.softmax(last, -1), 1, generator=generator))
        else:
            token = int(last.argmax())
        if token == chat.end_id or len(out) == max_new_tokens or cache.length >= capacity:
            return out
        out.append(token)
        logits, _ = model(torch.tensor([[token]], device=device), cache=cache)


def reply(model: Transformer, chat: ChatTokenizer, messages: list[Message], **kwargs) -> str:
    """The model's reply as text (chat tokens dropped)."""
    return chat.decode(reply_ids(model, chat, messages, **kwargs))
