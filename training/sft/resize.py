"""Give a pretrained checkpoint rows for the chat tokens: the start of the first fine-tuning stage.

The chat tokens take ids after the base tokenizer's (training/sft/template.py), usually past the
model's ``vocab_size``. The embedding (and an untied head) gets the missing rows, and every chat
token's row, even one that existed but was never trained on, is set to the mean of the base
vocabulary's rows: a new token starts as "an average token" instead of a random direction whose
logit could dominate (Hewitt, "Initializing new word embeddings", 2021). Written as a podtrain
checkpoint (tag ``final`` in its own folder), with the model section of its config updated, so a
stage starts from it through ``init_from`` like from any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training import checkpoint as ckpt
from training.atomic import atomic_write_json

ROWS = ("embed_tokens.weight", "lm_head.weight")
INIT_TAG = "final"


def resize_rows(weight: torch.Tensor, vocab_size: int, base_vocab: int, new_ids: list[int]) -> torch.Tensor:
    """``weight`` (V, d) -> (max(V, vocab_size), d), the rows of ``new_ids`` = mean of rows [0, base_vocab)."""
    rows = max(weight.shape[0], vocab_size)
    out = torch.empty(rows, weight.shape[1], dtype=weight.dtype)
    out[: weight.shape[0]] = weight
    mean = weight[: min(base_vocab, weight.shape[0])].float().mean(0).to(weight.dtype)
    out[weight.shape[0] :] = mean  # ids past the chat tokens (none unless vocab_size was rounded up) start the same way
    out[new_ids] = mean
    return out


def resize_checkpoint(source_dir: str | Path, source_tag: str, out_dir: str | Path, vocab_size: int, base_vocab: int,
                      new_ids: list[int]) -> Path:
    """Write ``out_dir/final`` = ``source_dir/source_tag`` with rows for ``new_ids``; returns the tag path."""
    loaded = ckpt.load_tag(source_dir, source_tag)
    weights = dict(loaded.weights)
    for name in ROWS:
        if name in weights:
            weights[name] = resize_rows(weights[name], vocab_size, base_vocab, new_ids)
    config = dict(loaded.config)
    config["model"] = {**config.get("model", {}), "vocab_size": int(weights["embed_tokens.weight"].shape[0])}
    snap = ckpt.Snapshot(INIT_TAG, loaded.step, weights, {"step": loaded.step, "format": ckpt.FORMAT,
                                                         "resized_from": f"{Path(source_dir) / source_tag}"}, config)
    ckpt.write_snapshot(out_dir, snap)
    atomic_write_json(Path(out_dir) / "resized.json", {"source": str(Path(source_dir) / source_tag), "base_vocab": base_vocab,
                                                       "vocab_size": config["model"]["vocab_size"], "new_ids": new_ids})
    return Path(out_dir) / INIT_TAG
