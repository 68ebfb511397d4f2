"""Shared by the SFT tests: a real byte-level BPE bundle (trained by the pipeline's own code on
standard-library text) with the chat tokens added, and a tiny model config for it."""

from __future__ import annotations

from pathlib import Path

from orchestrator.tokenizer.bpe import prepare_tokenizer
from test_tokenizer import make_documents, write_text_dir
from training.sft.template import ChatTokenizer, write_chat_bundle

BASE_VOCAB = 512


def make_chat_bundle(root: Path) -> ChatTokenizer:
    write_text_dir(root / "text", make_documents(60_000), num_shards=1)
    prepare_tokenizer([root / "text"], root / "base", BASE_VOCAB)
    return write_chat_bundle(root / "base", root / "chat")


def tiny_model_config(vocab_size: int, **extra: object) -> dict:
    return {"vocab_size": vocab_size, "d_model": 64, "num_layers": 2, "max_seq_len": 256,
            "attention": {"n_heads": 4}, "ffn": {"hidden_size": 128}, **extra}
