"""``train_data``/``val_data`` -> the stream that reads them: token shards, nanoGPT ``.bin``, or text.

The files a spec resolves to decide the reader (``training.data.resolve_inputs``): podtrain's
``.tok`` shards and nanoGPT's raw uint16 ``.bin`` are memory-mapped windows (``TokenStream``);
parquet, jsonl and txt files are tokenized on the fly (``TextStream``, seed 003's order). Both have
the same interface (``read_rows``, ``state_dict``, ``load_state_dict``, ``rewind``, ``close``), so
the batch loader, the prefetcher and checkpoints do not care which one runs.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

from training.config import TrainConfig
from training.data import BatchLoader, TokenStream, iter_eval_batches, resolve_inputs
from training.text_data import TextStream, inspect_file
from training.text_tokenizer import TextTokenizer, load_text_tokenizer

Stream = TokenStream | TextStream


def open_stream(spec: str | list[str], key: str, cfg: TrainConfig, tokenizer: Callable[[], TextTokenizer | None]) -> Stream:
    """The stream over ``spec``; ``tokenizer`` is called only when the files are text."""
    kind, paths = resolve_inputs(spec, key)
    if kind == "tokens":
        return TokenStream(paths, cfg.seed, cfg.model.vocab_size, key=key)
    files = [inspect_file(p, key) for p in paths]
    return TextStream(files, tokenizer() if any(not f.ids for f in files) else None, cfg.seed, cfg.model.vocab_size, key=key)


def pretrain_loaders(cfg: TrainConfig, rank: int, world: int) -> tuple[BatchLoader, Callable[[], Iterator[tuple]] | None, list[TokenStream]]:
    """The training loader, the validation batches (the same ones at every evaluation), and the
    token streams among them, whose ids ``training.id_scan`` checks against the vocabulary (text is
    tokenized by a tokenizer already checked against it).

    Text validation batches are tokenized once and kept (``eval_steps`` batches), since reading
    them again would tokenize the same rows at every evaluation.
    """
    tokenizer = functools.cache(lambda: load_text_tokenizer(cfg.tokenizer_path) if cfg.tokenizer_path else None)
    train = open_stream(cfg.train_data, "train_data", cfg, tokenizer)
    loader = BatchLoader(train, cfg.batch_size, cfg.seq_len, rank, world)
    if not cfg.val_data:
        return loader, None, _token_streams(train)
    val = open_stream(cfg.val_data, "val_data", cfg, tokenizer)

    def batches() -> Iterator[tuple]:
        return iter_eval_batches(val, cfg.batch_size, cfg.seq_len, cfg.eval_steps, rank, world)

    if isinstance(val, TokenStream):
        return loader, batches, _token_streams(train, val)

    @functools.cache
    def kept() -> list[tuple]:
        out = list(batches())
        val.close()
        return out

    return loader, lambda: iter(kept()), _token_streams(train)


def _token_streams(*streams: Stream) -> list[TokenStream]:
    return [s for s in streams if isinstance(s, TokenStream)]
