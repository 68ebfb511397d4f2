"""The chat template: special tokens with fixed ids, one jinja template, and token ids with a loss mask.

A conversation renders as ``<|role|>content<|end|>`` per message, roles from
training/sft/records.py. The seven chat tokens are appended to the base tokenizer in the fixed
order of :data:`CHAT_TOKENS`, so their ids are ``base_vocab + i`` for every model trained from the
same base bundle. The template is written into the bundle's ``tokenizer_config.json``
(``chat_template``), so ``transformers``' ``apply_chat_template`` gives the ids this module gives.

Loss mask: a token counts when the model has to produce it. That is every token of an output
message (assistant, tool_call, reasoning: training/sft/records.py ``OUTPUT_ROLES``): the tag that
opens it (how the model chooses between answering, calling a tool and reasoning first), its content
and the ``<|end|>`` that closes it (how it learns to stop). System, user and tool-result messages
are context only, tags included.

Segments are encoded one by one (tag id, content, end id); the byte-level pre-tokenizer splits at
special tokens anyway, so the concatenation equals encoding the rendered string whole. Content is
encoded with special-token parsing off: a literal ``<|end|>`` typed by a user stays text and cannot
end a message (``apply_chat_template`` would parse it as the token; the only case where the two
differ, and the reason ours is the one training uses).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.sft.records import OUTPUT_ROLES, ROLES, Message

END_TOKEN = "<|end|>"
CHAT_TOKENS = tuple(f"<|{role}|>" for role in ROLES) + (END_TOKEN,)
GENERATION_PROMPT = "<|assistant|>"
CHAT_META = "chat.json"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['" + "', '".join(ROLES) + "'] -%}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END_TOKEN + "' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + GENERATION_PROMPT + "' }}{%- endif -%}"
)


class TemplateError(ValueError):
    """A tokenizer bundle cannot take or does not carry the chat tokens; the message names the path."""


def render(messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The text :data:`CHAT_TEMPLATE` produces, in Python: what the tests hold the jinja template to."""
    text = "".join(f"<|{m['role']}|>{m['content']}{END_TOKEN}" for m in messages)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


@dataclass(frozen=True)
class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` carrying the chat tokens, and their ids."""

    tokenizer: Any
    ids: dict[str, int]
    directory: Path

    @classmethod
    def load(cls, directory: str | Path) -> "ChatTokenizer":
        from tokenizers import Tokenizer

        directory = Path(directory)
        meta_path = directory / CHAT_META
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except FileNotFoundError as exc:
            raise TemplateError(f"{exc.filename}: missing (is {directory} a chat tokenizer bundle? "
                                "orchestrate sft prepare writes one)") from None
        except Exception as exc:  # the Rust loader raises a bare Exception
            raise TemplateError(f"{directory}: cannot load the chat tokenizer: {exc}") from None
        ids = {name: int(i) for name, i in meta["chat_token_ids"].items()}
        for name, i in ids.items():
            if tok.token_to_id(name) != i:
                raise TemplateError(f"{directory}/tokenizer.json: {name} has id {tok.token_to_id(name)}, {CHAT_META} says {i}")
        return cls(tok, ids, directory)

    @property
    def end_id(self) -> int:
        return self.ids[END_TOKEN]

    @property
    def vocab_size(self) -> int:
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, messages: list[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation and, per token, whether the loss counts it."""
        ids: list[int] = []
        mask: list[bool] = []
        contents = self._encode_contents([m["content"] for m in messages])
        for message, content in zip(messages, contents):
            piece = [self.ids[f"<|{message['role']}|>"], *content, self.end_id]
            ids += piece
            mask += [message["role"] in OUTPUT_ROLES] * len(piece)
        if add_generation_prompt:
            ids.append(self.ids[GENERATION_PROMPT])
            mask.append(False)
        return ids, mask

    def _encode_contents(self, texts: list[str]) -> list[list[int]]:
        self.tokenizer.encode_special_tokens = True  # content is text, never a control token
        try:
            return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.tokenizer.encode_special_tokens = False

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def write_chat_bundle(base_dir: str | Path, out_dir: str | Path) -> ChatTokenizer:
    """Copy the base tokenizer bundle to ``out_dir`` with the chat tokens added and the template written.

    Output: ``tokenizer.json``, ``tokenizer_config.json`` (chat_template, eos/pad tokens: what
    ``PreTrainedTokenizerFast.from_pretrained(out_dir)`` reads), ``meta.json`` (a podtrain bundle
    with the new id space) and ``chat.json`` (the chat token ids), written last: its presence marks
    a whole bundle. Idempotent: a bundle already made from the same base is reused.
    """
    from tokenizers import AddedToken

    from training.tokenizer_bundle import EOT_TOKEN, PAD_TOKEN, TokenizerBundle
    from training.atomic import atomic_write_bytes, atomic_write_json

    base = TokenizerBundle.load(base_dir)
    out = Path(out_dir)
    if (out / CHAT_META).exists():
        meta = json.loads((out / CHAT_META).read_text(encoding="utf-8"))
        if meta.get("base_tokenizer_sha256") == base.fingerprint and meta.get("template") == CHAT_TEMPLATE:
            return ChatTokenizer.load(out)
    tok = base.load_tokenizer(encode_special_tokens=False)
    if any(tok.token_to_id(t) is not None for t in CHAT_TOKENS):
        raise TemplateError(f"{base.tokenizer_json}: already holds chat tokens; pass the pretraining bundle, not a chat bundle")
    start = base.vocab_size
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    ids = {t: tok.token_to_id(t) for t in CHAT_TOKENS}
    if list(ids.values()) != list(range(start, start + len(CHAT_TOKENS))):
        raise TemplateError(f"{base.tokenizer_json}: chat tokens got ids {list(ids.values())}, expected {start}..")
    out.mkdir(parents=True, exist_ok=True)
    (out / CHAT_META).unlink(missing_ok=True)
    data = tok.to_str().encode("utf-8")
    atomic_write_bytes(out / "tokenizer.json", data)
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "bos_token": None,
        "eos_token": END_TOKEN,
        "pad_token": PAD_TOKEN if tok.token_to_id(PAD_TOKEN) is not None else EOT_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [t for t in CHAT_TOKENS if t != END_TOKEN],
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
    })
    chat = TokenizerBundle(out, start + len(CHAT_TOKENS), base.eot_id, base.pad_id, hashlib.sha256(data).hexdigest(),
                           base.manifest_fingerprint, "chat", {**base.settings, "chat_tokens": ids}, base.library)
    atomic_write_json(out / "meta.json", chat.to_meta())
    atomic_write_json(out / CHAT_META, {"chat_token_ids": ids, "template": CHAT_TEMPLATE,
                                        "base_tokenizer_sha256": base.fingerprint, "base_vocab_size": start})
    return ChatTokenizer.load(out)


def label_array(ids: list[int], mask: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one example: targets are the next token where the mask counts it, else -100."""
    arr = np.asarray(ids, dtype=np.int64)
    targets = np.where(np.asarray(mask[1:], dtype=bool), arr[1:], -100)
    return arr[:-1], targets
