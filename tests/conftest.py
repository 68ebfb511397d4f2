"""Shared fixtures: a small real-text corpus (the standard library's own sources, which every Python
install has) and byte-level token shards made from it, so trainer tests need no tokenizer."""

from __future__ import annotations

import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from training.token_shards import write_token_shard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BYTE_VOCAB = 257  # 256 byte values + end-of-text
BYTE_EOT = 256


def stdlib_documents(max_bytes: int = 2_000_000) -> list[str]:
    """Real text, deterministic: the standard library's .py files in sorted order, one per document."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return docs


def byte_tokens(docs: list[str]) -> np.ndarray:
    parts = []
    for doc in docs:
        parts.append(np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.uint16))
        parts.append(np.array([BYTE_EOT], dtype=np.uint16))
    return np.concatenate(parts)


def write_byte_shards(directory: Path, docs: list[str], num_shards: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(docs)), num_shards)):
        path = directory / f"shard_{i:05d}.tok"
        write_token_shard(path, byte_tokens([docs[j] for j in chunk]), BYTE_VOCAB, BYTE_EOT)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def byte_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train/ (4 shards, ~1.2 MB) and val/ (1 shard) of byte tokens from real Python sources."""
    root = tmp_path_factory.mktemp("byte_corpus")
    docs = stdlib_documents(1_400_000)
    split = max(1, len(docs) // 10)
    write_byte_shards(root / "train", docs[split:], 4)
    write_byte_shards(root / "val", docs[:split], 1)
    return {"train": root / "train", "val": root / "val"}


def tiny_config(corpus: dict[str, Path], out: Path, **overrides: object) -> dict:
    """A ~100k-parameter model on the byte corpus: seconds per hundred steps on a CPU."""
    cfg: dict = {
        "train_data": str(corpus["train"]),
        "val_data": str(corpus["val"]),
        "seq_len": 64,
        "batch_size": 8,
        "num_steps": 20,
        "checkpoint_dir": str(out / "ckpt"),
        "save_every": 10,
        "log_every": 1,
        "eval_every": 10,
        "eval_steps": 2,
        "num_workers": 0,
        "device": "cpu",
        "model": {"vocab_size": BYTE_VOCAB, "d_model": 64, "num_layers": 2, "max_seq_len": 128,
                  "attention": {"n_heads": 4}, "ffn": {"hidden_size": 128}},
        "optimizer": {"lr": 3e-3},
        "scheduler": {"warmup_steps": 5},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg



def wait_for_metric_lines(metrics: Path, count: int, timeout: float, poll: float = 0.2) -> None:
    """Until a running trainer's ``metrics.jsonl`` holds ``count`` lines, or ``timeout`` seconds
    pass: the run is under way, so a signal sent now lands mid-run."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        time.sleep(poll)

def write_byte_tokenizer(directory: Path) -> Path:
    """A real ``tokenizers`` tokenizer.json whose ids are the UTF-8 bytes (256 = end-of-text): it
    encodes text exactly as the byte corpus was, so byte-corpus checkpoints can be sampled, evaluated
    on text and exported with a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    chars = {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}  # GPT-2's bytes_to_unicode
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory
