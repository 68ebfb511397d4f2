"""Training windows from token shards, shuffled, with an exact, resumable position.

A window is ``T + 1`` contiguous tokens starting at a multiple of ``T`` inside one shard: the input
row and, shifted by one, its targets (no padding; a window may span document boundaries, which the
end-of-text token marks, as in GPT-2 pretraining). Each epoch visits the shards in an order
reshuffled from the seed and, inside a shard, its windows in an order reshuffled from (seed, epoch,
shard). Reading windows in file order instead (llm.c's contiguous ``B*T`` blocks) makes every batch
a few neighbouring documents; on a corpus whose shards keep documents in source order that doubles
the validation loss of a short run, so windows are shuffled (nanoGPT samples random offsets, which
cannot resume exactly; this order can).

Under data parallelism every micro-step takes one global block of ``world * B`` windows and rank
``r`` keeps rows ``[r*B, (r+1)*B)``, so the union of the ranks' rows is exactly what one process with
batch ``world*B`` would read: losses are comparable across world sizes and a checkpoint resumes on
any world size.

The position (epoch, index in the epoch's shard order, window in that shard's order) is the loader
state saved in checkpoints. Shards are memory-mapped per read rather than held open, which keeps RSS
flat on long runs (nanoGPT PR #428).
"""

from __future__ import annotations

import glob
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from training.token_shards import NANOGPT_SUFFIX, TOKEN_SUFFIXES, check_token_ids, open_tokens, read_header


class DataError(ValueError):
    """The configured data cannot be read; the message names the key and path."""


# Text files the trainer tokenizes on the fly (training/text_data.py), longest suffix first.
TEXT_SUFFIX_KINDS = (
    (".jsonl.gz", "json"), (".json.gz", "json"), (".txt.gz", "text"),
    (".parquet", "parquet"), (".jsonl", "json"), (".json", "json"), (".txt", "text"),
)
TEXT_SUFFIXES = tuple(suffix for suffix, _ in TEXT_SUFFIX_KINDS)


def text_kind(path: Path) -> str | None:
    """``parquet``, ``json`` or ``text`` for a text input file, None for anything else."""
    return next((kind for suffix, kind in TEXT_SUFFIX_KINDS if path.name.endswith(suffix)), None)


def _kind(path: Path) -> str | None:
    if path.name.endswith(TOKEN_SUFFIXES) or path.name.endswith(NANOGPT_SUFFIX):
        return "tokens"
    return "text" if text_kind(path) else None


def _visible(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".")


def resolve_inputs(spec: str | list[str], key: str = "train_data") -> tuple[str, list[Path]]:
    """Expand a path, glob, directory or list of them into input files (in order, deduplicated) and
    say which kind they are: ``tokens`` (``.tok`` shards, nanoGPT ``.bin``) or ``text``.

    A directory gives its ``.tok`` shards, or when it has none every text file under it (seed 004's
    ``processed/pretrain/<dataset>/*.jsonl`` included), sorted by path. Kinds cannot be mixed.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if any(ch in item for ch in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if _visible(Path(p)) and _kind(Path(p))]
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir() if _visible(p) and p.name.endswith(TOKEN_SUFFIXES))
            matches = matches or sorted(p for p in path.rglob("*") if _visible(p) and text_kind(p))
        elif path.is_file():
            if _kind(path) is None:
                raise DataError(f"{key}: {item} is neither token shards ({', '.join(TOKEN_SUFFIXES)}, nanoGPT {NANOGPT_SUFFIX}) "
                                f"nor text ({', '.join(TEXT_SUFFIXES)})")
            matches = [path]
        else:
            raise DataError(f"{key}: {item} does not exist")
        if not matches:
            raise DataError(f"{key}: no token shards ({', '.join(TOKEN_SUFFIXES)}) or text files ({', '.join(TEXT_SUFFIXES)}) "
                            f"found at {item}")
        found.extend(matches)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    kinds = {_kind(p) for p in unique}
    if len(kinds) > 1:
        raise DataError(f"{key}: mixes token shards and text files; give one kind (tokenize the text with orchestrate, "
                        "or point at the text alone)")
    return kinds.pop(), unique


def resolve_shards(spec: str | list[str], key: str = "train_data") -> list[Path]:
    """Like :func:`resolve_inputs`, for readers of token shards only (text is an error naming ``key``)."""
    kind, paths = resolve_inputs(spec, key)
    if kind != "tokens":
        raise DataError(f"{key}: {paths[0]} is text; this reads token shards ({', '.join(TOKEN_SUFFIXES)}, nanoGPT {NANOGPT_SUFFIX})")
    return paths


@dataclass
class StreamState:
    epoch: int = 0
    index: int = 0
    offset: int = 0  # position in the current shard's window order


class TokenStream:
    """An endless, deterministic stream of windows over shards (reshuffled per epoch)."""

    def __init__(self, paths: list[Path], seed: int, vocab_size: int, shuffle: bool = True, key: str = "train_data") -> None:
        self.paths = paths
        self.seed = seed
        self.shuffle = shuffle
        self.key = key
        self.sizes = []
        for p in paths:
            header = read_header(p)
            if header.vocab_size > vocab_size:
                raise DataError(
                    f"{key}: {p} was tokenized for a vocabulary of {header.vocab_size}, "
                    f"larger than model.vocab_size={vocab_size}"
                )
            self.sizes.append(header.num_tokens)
        self.vocab_size = vocab_size
        self.total_tokens = sum(self.sizes)
        self.longest = max(self.sizes, default=0)
        self.state = StreamState()
        self._orders: dict[int, np.ndarray] = {}
        self._windows: dict[tuple[int, int, int], np.ndarray] = {}
        self.checked: set[int] = set()  # shards whose ids are known to fit (this reader's check, or training/id_scan.py)

    def order(self, epoch: int) -> np.ndarray:
        """The order in which ``epoch`` visits the shards."""
        if epoch not in self._orders:
            idx = np.arange(len(self.paths))
            if self.shuffle:
                idx = np.random.default_rng([self.seed, epoch]).permutation(idx)
            self._orders = {epoch: idx}
        return self._orders[epoch]

    def windows(self, epoch: int, shard: int, seq_len: int) -> np.ndarray:
        """Start offsets of ``shard``'s windows in the order ``epoch`` visits them."""
        key = (epoch, shard, seq_len)
        if key not in self._windows:
            starts = np.arange(max(0, (self.sizes[shard] - 1) // seq_len), dtype=np.int64) * seq_len
            if self.shuffle:
                starts = np.random.default_rng([self.seed, epoch, shard]).permutation(starts)
            self._windows = {key: starts}
        return self._windows[key]

    def read_rows(self, n: int, seq_len: int) -> np.ndarray:
        """The next ``n`` windows as an ``(n, seq_len + 1)`` array; the position moves past them."""
        if self.longest < seq_len + 1:
            raise DataError(f"{self.key}: the shards hold {self.total_tokens:,} tokens in all, "
                            f"not one window of seq_len+1={seq_len + 1} in any shard")
        out = np.empty((n, seq_len + 1), dtype=np.int64)
        st = StreamState(**asdict(self.state))
        filled = 0
        while filled < n:
            shard = int(self.order(st.epoch)[st.index])
            starts = self.windows(st.epoch, shard, seq_len)[st.offset : st.offset + n - filled]
            if len(starts) == 0:
                st.index, st.offset = st.index + 1, 0
                if st.index == len(self.paths):
                    st.epoch, st.index = st.epoch + 1, 0
                continue
            if shard not in self.checked:  # once per shard: an id past the embedding is a traceback (CPU) or a device assert (CUDA)
                check_token_ids(self.paths[shard], self.vocab_size, label="model.vocab_size")
                self.checked.add(shard)
            tokens = open_tokens(self.paths[shard])
            out[filled : filled + len(starts)] = tokens[starts[:, None] + np.arange(seq_len + 1)]
            del tokens
            filled += len(starts)
            st.offset += len(starts)
        self.state = st
        return out

    def state_dict(self) -> dict[str, int]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "row" in state:
            raise DataError(f"{self.key}: the checkpoint's reader position is for text files, not token shards")
        self.state = StreamState(**{k: int(v) for k, v in state.items()})

    def rewind(self) -> None:
        """Back to the start of epoch 0 (validation reads the same windows every time)."""
        self.state = StreamState()

    def close(self) -> None:
        """Nothing is held open (every read maps its shard anew)."""


class WindowStream(Protocol):
    """What the batch loader needs of a stream: TokenStream here, TextStream (training/text_data.py)."""

    def read_rows(self, n: int, seq_len: int) -> np.ndarray: ...
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, state: dict[str, int]) -> None: ...
    def rewind(self) -> None: ...
    def close(self) -> None: ...


class BatchLoader:
    """Micro-batches ``(x, y)`` of shape (B, T) for one rank, with the stream position as state."""

    def __init__(self, stream: WindowStream, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1) -> None:
        self.stream, self.B, self.T = stream, batch_size, seq_len
        self.rank, self.world = rank, world_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.stream.read_rows(self.world * self.B, self.T)
        mine = torch.from_numpy(block[self.rank * self.B : (self.rank + 1) * self.B])
        return mine[:, :-1].contiguous(), mine[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)

    def close(self) -> None:
        self.stream.close()


class Prefetcher:
    """Reads the next batches on a background thread so the step never waits on disk.

    Batches are produced strictly in order and each carries the loader state *after* it, so the
    state reported is that of the last batch consumed: exact resume is unaffected by prefetching.
    """

    def __init__(self, loader: "BatchLoader", depth: int, pin: bool = False) -> None:
        self.loader = loader
        self.depth = depth
        self.pin = pin  # page-locked batches: the host-to-GPU copy runs asynchronously (non_blocking)
        self._state = loader.state_dict()
        self._waited = 0.0
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if depth > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                item = (self._read(), self.loader.state_dict())
            except BaseException as exc:  # surface reader errors in the training thread
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _read(self) -> tuple:
        batch = self.loader.next_batch()  # (x, y), or (x, y, doc_ids) from the SFT loader
        return tuple(t.pin_memory() if self.pin and t is not None else t for t in batch)

    def next_batch(self) -> tuple:
        start = time.perf_counter()
        try:
            if self._queue is None:
                batch = self._read()
                self._state = self.loader.state_dict()
                return batch
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            batch, self._state = item
            return batch
        finally:
            self._waited += time.perf_counter() - start

    def take_waited(self) -> float:
        """Seconds the training step spent waiting for batches since the last call (the step starved of data)."""
        waited, self._waited = self._waited, 0.0
        return waited

    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def close(self) -> None:
        """Stop the thread and wait for it. Left running, it may be inside a torch call when the
        interpreter exits: the thread is then ended inside C++, which aborts the process ("terminate
        called without an active exception", exit -6) after a run that succeeded."""
        self._stop.set()
        close = getattr(self.loader, "close", None)  # a text reader's tokenizing thread (the SFT loader holds none)
        if close is not None:
            close()  # a read waiting on it fails instead of hanging, so the join below ends
        if self._queue is not None:
            self._thread.join()


def iter_eval_batches(stream: WindowStream, batch_size: int, seq_len: int, steps: int, rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``steps`` batches of the validation stream, from its start every time: the same windows at every eval."""
    stream.rewind()
    loader = BatchLoader(stream, batch_size, seq_len, rank, world)
    for _ in range(steps):
        yield loader.next_batch()
