"""SFT examples as the trainer's batches: packed into ``seq_len`` rows with ``doc_ids``, or padded.

An example is one conversation's token ids and loss mask (training/sft/template.py). Both layouts
give ``(x, y, doc_ids)`` micro-batches of the trainer's shape, ``y`` = -100 where the loss does not
count (prompt, tool results, padding):

- ``packed``: examples are laid end to end into rows of ``seq_len`` positions, never split across
  rows; ``doc_ids`` numbers the examples of a row, so the model's block-diagonal mask and per-example
  positions make each example compute exactly what it would alone (training/model.py). The tail of a
  row that the next example does not fit is padding, a block of its own.
- ``padded``: one example per row, padded to the longest example of the global micro-batch;
  ``doc_ids`` is None (plain causal attention: the padding comes after every real token).

bench/sft.py measures both; ``packed`` is the default (docs/finetune.md has the figures).

Order and resume: each epoch visits the examples in an order reshuffled from (seed, epoch); rows
are filled from that order, so the position (epoch, next example) is the whole loader state and a
checkpoint resumes on exactly the next batch. Under data parallelism every micro-step builds one
global block of ``world * B`` rows and rank ``r`` keeps rows ``[r*B, (r+1)*B)``, as the pretraining
loader does (training/data.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from training.data import DataError
from training.sft.records import RecordError, to_messages
from training.sft.template import ChatTokenizer, TemplateError

CACHE_VERSION = 1
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass
class Examples:
    """Tokenized examples, flat: example i is ``tokens[offsets[i]:offsets[i+1]]`` with its loss mask."""

    tokens: np.ndarray  # int32
    mask: np.ndarray  # bool: the token counts toward the loss
    offsets: np.ndarray  # int64, len = examples + 1
    skipped: dict[str, int]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.mask[a:b]


def tokenize_records(lines: list[str], chat: ChatTokenizer, max_tokens: int, label: str,
                     warn: Callable[[str], None] | None = None) -> Examples:
    """Encode canonical JSONL lines; malformed ones and ones with nothing left to learn are skipped and counted.

    An example longer than ``max_tokens`` is cut (the loader never splits one across rows); one
    whose cut leaves no loss-bearing target is dropped.
    """
    tokens, masks, offsets = [], [], [0]
    skipped = {"malformed": 0, "truncated": 0, "no_target": 0}
    shown = 0
    for row, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            messages = to_messages(json.loads(line))
        except (json.JSONDecodeError, RecordError) as exc:
            skipped["malformed"] += 1
            if warn is not None and shown < 5:
                warn(f"{label}: line {row}: skipped, {exc}")
                shown += 1
            continue
        ids, mask = chat.encode(messages)
        if len(ids) > max_tokens:
            skipped["truncated"] += 1
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        if not any(mask[1:]):
            skipped["no_target"] += 1
            continue
        tokens.append(np.asarray(ids, dtype=np.int32))
        masks.append(np.asarray(mask, dtype=bool))
        offsets.append(offsets[-1] + len(ids))
    if not tokens:
        raise DataError(f"{label}: no usable example (skipped: {skipped})")
    return Examples(np.concatenate(tokens), np.concatenate(masks), np.asarray(offsets, dtype=np.int64), skipped)


def load_examples(paths: list[Path], chat: ChatTokenizer, max_tokens: int, key: str,
                  warn: Callable[[str], None] | None = None) -> Examples:
    """Tokenize canonical JSONL files, through a cache beside each file keyed by its content and the tokenizer.

    The cache (``<file>.<key>.npz``) saves every rank of every restart from re-tokenizing a large
    dataset; it is written to a temporary name and renamed, so concurrent ranks cannot corrupt it.
    """
    from training.atomic import atomic_path

    parts = []
    tok_sha = hashlib.sha256(chat.tokenizer.to_str().encode()).hexdigest()
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{key}: {path}: cannot read: {exc.strerror}") from None
        digest = hashlib.sha256(data + tok_sha.encode() + f"{max_tokens}:{CACHE_VERSION}".encode()).hexdigest()[:16]
        cache = path.with_name(f".{path.name}.{digest}.npz")
        if cache.exists():
            try:
                with np.load(cache) as z:
                    parts.append(Examples(z["tokens"], z["mask"], z["offsets"], json.loads(str(z["skipped"]))))
                continue
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: rebuilt below
        ex = tokenize_records(data.decode("utf-8", errors="replace").splitlines(), chat, max_tokens, f"{key}: {path}", warn)
        try:
            with atomic_path(cache) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, tokens=ex.tokens, mask=ex.mask, offsets=ex.offsets, skipped=json.dumps(ex.skipped))
        except OSError:
            pass  # a read-only data folder: no cache, same examples
        parts.append(ex)
    if len(parts) == 1:
        return parts[0]
    offsets = [np.zeros(1, dtype=np.int64)]
    base = 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    skipped = {k: sum(p.skipped[k] for p in parts) for k in parts[0].skipped}
    return Examples(np.concatenate([p.tokens for p in parts]), np.concatenate([p.mask for p in parts]),
                    np.concatenate(offsets), skipped)


@dataclass
class SFTState:
    epoch: int = 0
    cursor: int = 0  # next example in this epoch's order


class SFTLoader:
    """Micro-batches ``(x, y, doc_ids)`` of SFT examples for one rank; state = (epoch, next example)."""

    def __init__(self, examples: Examples, batch_size: int, seq_len: int, packing: str, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, pad_id: int = 0) -> None:
        if packing not in ("packed", "padded"):
            raise ValueError(f"sft.packing: {packing!r}, expected packed or padded")
        self.ex, self.B, self.T, self.packing = examples, batch_size, seq_len, packing
        self.seed, self.rank, self.world, self.shuffle, self.pad_id = seed, rank, world_size, shuffle, pad_id
        self.state = SFTState()
        self._order: tuple[int, np.ndarray] | None = None
        lengths = np.diff(examples.offsets) - 1  # positions: an example of n tokens trains n - 1 of them
        if int(lengths.max()) > seq_len:
            raise ValueError(f"an example has {int(lengths.max())} positions, more than seq_len={seq_len} (cut it first)")
        self.lengths = lengths

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            idx = np.arange(len(self.ex))
            if self.shuffle:
                idx = np.random.default_rng([self.seed, epoch]).permutation(idx)
            self._order = (epoch, idx)
        return self._order[1]

    def _take(self) -> int:
        """The next example in order (the position moves past it)."""
        order = self.order(self.state.epoch)
        i = int(order[self.state.cursor])
        self.state.cursor += 1
        if self.state.cursor == len(order):
            self.state = SFTState(self.state.epoch + 1, 0)
        return i

    def _peek(self) -> int:
        return int(self.order(self.state.epoch)[self.state.cursor])

    def _packed_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.full(self.T, self.pad_id, dtype=np.int64)
        y = np.full(self.T, -100, dtype=np.int64)
        doc = np.empty(self.T, dtype=np.int64)
        used, n = 0, 0
        while used + self.lengths[self._peek()] <= self.T:
            tokens, mask = self.ex.example(self._take())
            k = len(tokens) - 1
            x[used : used + k] = tokens[:-1]
            y[used : used + k] = np.where(mask[1:], tokens[1:], -100)
            doc[used : used + k] = n
            used, n = used + k, n + 1
            if n > len(self.ex):  # a row longer than the whole dataset: stop repeating it
                break
        doc[used:] = n  # the padding tail: a block of its own
        return x, y, doc

    def next_batch(self) -> Batch:
        rows = self.world * self.B
        if self.packing == "packed":
            built = [self._packed_row() for _ in range(rows)]
            x, y, doc = (np.stack(parts) for parts in zip(*built))
            lo, hi = self.rank * self.B, (self.rank + 1) * self.B
            return torch.from_numpy(x[lo:hi]), torch.from_numpy(y[lo:hi]), torch.from_numpy(doc[lo:hi])
        picked = [self._take() for _ in range(rows)]
        width = int(max(self.lengths[i] for i in picked))
        x = np.full((rows, width), self.pad_id, dtype=np.int64)
        y = np.full((rows, width), -100, dtype=np.int64)
        for r, i in enumerate(picked):
            tokens, mask = self.ex.example(i)
            k = len(tokens) - 1
            x[r, :k] = tokens[:-1]
            y[r, :k] = np.where(mask[1:], tokens[1:], -100)
        lo, hi = self.rank * self.B, (self.rank + 1) * self.B
        return torch.from_numpy(x[lo:hi]), torch.from_numpy(y[lo:hi]), None

    def state_dict(self) -> dict[str, int]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = SFTState(**{k: int(v) for k, v in state.items() if k in ("epoch", "cursor")})


def sft_paths(spec: str | list[str], key: str) -> list[Path]:
    """The canonical JSONL files named by ``train_data``/``val_data`` (files or globs)."""
    import glob

    items = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for item in items:
        found = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        for p in found:
            if not Path(p).is_file():
                raise DataError(f"{key}: {p} is not a file (an SFT stage reads canonical .jsonl files: orchestrate sft prepare)")
            paths.append(Path(p))
        if not found:
            raise DataError(f"{key}: nothing matches {item}")
    return paths


def build_sft_loaders(cfg, rank: int, world_size: int, warn: Callable[[str], None] | None = None
                      ) -> tuple[SFTLoader, Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None]:
    """The training loader of an SFT config and, with ``val_data``, a function yielding its eval batches
    (the first ``eval_steps`` micro-batches of the validation examples in file order, every time)."""
    if not cfg.tokenizer_path:
        raise DataError(f"tokenizer_path: required for stage {cfg.stage} (the chat tokenizer bundle)")
    try:
        chat = ChatTokenizer.load(cfg.tokenizer_path)
    except TemplateError as exc:
        raise DataError(f"tokenizer_path: {exc}") from None
    if chat.vocab_size > cfg.model.vocab_size:
        raise DataError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the chat tokenizer's {chat.vocab_size} ids "
                        f"({cfg.tokenizer_path}); start from a checkpoint with rows for the chat tokens (orchestrate sft init)")
    pad = chat.end_id
    train = load_examples(sft_paths(cfg.train_data, "train_data"), chat, cfg.seq_len + 1, "train_data", warn)
    if warn is not None and any(train.skipped.values()):
        warn(f"train_data: {len(train):,} examples; skipped {train.skipped}")
    loader = SFTLoader(train, cfg.batch_size, cfg.seq_len, cfg.sft.packing, cfg.seed, rank, world_size, pad_id=pad)
    if not cfg.val_data:
        return loader, None
    val = load_examples(sft_paths(cfg.val_data, "val_data"), chat, cfg.seq_len + 1, "val_data", warn)

    def eval_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # padded whatever the training layout: plain (x, y) batches, which training/evaluate.py's
        # mean_loss takes as they are; each token's loss is the same in both layouts (tests/test_sft_template.py)
        ld = SFTLoader(val, cfg.batch_size, cfg.seq_len, "padded", cfg.seed, rank, world_size, shuffle=False, pad_id=pad)
        for _ in range(cfg.eval_steps):
            yield ld.next_batch()[:2]

    return loader, eval_batches
