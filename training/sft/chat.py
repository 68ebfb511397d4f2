"""Talk to a fine-tuned checkpoint through the chat template: the conversation plus ``<|assistant|>``
is the prompt, and the reply is what the model writes until it closes its message with ``<|end|>``
(training/generate.py does the decoding, with its KV cache and sampling settings)."""

from __future__ import annotations

from dataclasses import replace

from training.generate import SamplingParams, generate
from training.model import Transformer
from training.sft.records import Message
from training.sft.template import ChatTokenizer


def reply_ids(model: Transformer, chat: ChatTokenizer, messages: list[Message], params: SamplingParams) -> list[int]:
    """The ids of the model's reply to ``messages``, without the closing ``<|end|>``."""
    prompt, _ = chat.encode(messages, add_generation_prompt=True)
    ids = generate(model, prompt, replace(params, eos_id=chat.end_id))
    return ids[:-1] if ids and ids[-1] == chat.end_id else ids


def reply(model: Transformer, chat: ChatTokenizer, messages: list[Message], max_new_tokens: int = 128) -> str:
    """The greedy reply as text (what the accuracy checks use)."""
    return chat.decode(reply_ids(model, chat, messages, SamplingParams(max_new_tokens, temperature=0.0)))
