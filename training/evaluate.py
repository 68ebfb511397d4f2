"""Loss and perplexity of a model over batches: one function for the trainer and ``evaluate``.

:func:`mean_loss` is what the trainer's periodic validation, ``eval_only`` and the
``evaluate`` command all call, so ``evaluate`` on a run's own val shards, with the run's batch size,
sequence length and ``eval_steps``, reproduces the trainer's validation loss (same windows, same
order, same arithmetic). Other data (text, jsonl or parquet files, or each source of a data recipe)
is tokenized, joined with the end-of-text id as the encode stage does, and cut into consecutive
windows.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device,
              autocast: Callable[[], ContextManager[None]] = contextlib.nullcontext) -> torch.Tensor:
    """The mean over batches of each batch's mean token loss (a 0-d float32 tensor on ``device``).

    The model is in eval mode (no dropout) for the duration and put back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    losses = []
    try:
        for x, y in batches:
            with autocast():
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.float())
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("no batches to evaluate (fewer tokens than one window of seq_len + 1)")
    return torch.stack(losses).mean()


def perplexity(loss: float) -> float:
    """exp(loss), inf past float range rather than an OverflowError (an untrained huge-vocab model)."""
    return math.exp(loss) if loss < 700 else math.inf


def token_windows(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None) -> Iterator[Batch]:
    """Consecutive (x, y) windows of ``tokens`` in batches; a last partial batch is kept, a partial window dropped."""
    n = (len(tokens) - 1) // seq_len
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    starts = np.arange(n, dtype=np.int64) * seq_len
    for i in range(0, n, batch_size):
        rows = torch.from_numpy(tokens[starts[i : i + batch_size, None] + np.arange(seq_len + 1)].astype(np.int64))
        yield rows[:, :-1], rows[:, 1:]


def read_text_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a text shard (.txt, .txt.gz: one escaped document per line), .jsonl or .parquet file."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        import gzip
        import json

        with (gzip.open(path, "rt", encoding="utf-8") if name.endswith(".gz") else open(path, encoding="utf-8")) as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if text_field not in row:
                        raise ValueError(f"{path}:{number}: no field {text_field!r} (use --text-field)")
                    yield row[text_field]
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)}; use --text-field)")
        yield from (t for t in table.column(text_field).to_pylist() if t)
    else:
        from sharder.textshard import read_documents

        yield from read_documents(path)


def tokenize_documents(docs: Iterable[str], tokenizer, eot_id: int | None, limit: int | None = None) -> np.ndarray:
    """Token ids of up to ``limit`` documents, each followed by ``eot_id`` (the encode stage's layout)."""
    parts: list[np.ndarray] = []
    for i, doc in enumerate(docs):
        if limit is not None and i >= limit:
            break
        ids = tokenizer.encode(doc, add_special_tokens=False).ids
        parts.append(np.asarray(ids + ([eot_id] if eot_id is not None else []), dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
