"""Token shard format (version 1): a fixed 64-byte header, then the tokens.

Header, little-endian: magic ``b"PODTOKEN"`` (8 bytes), version (u32), itemsize (u32: 2 for
uint16, 4 for uint32), token count (u64), vocabulary size (u64), end-of-text id (u64), then
zero padding to 64 bytes. Files end in ``.tok``. Tokens follow as a flat array; documents are separated by the
end-of-text id. uint16 is used only when every id of the vocabulary (added tokens included)
is below 65536, since a narrowing cast silently corrupts ids.

Readers memory-map the token array and validate the header so that a truncated, foreign or
mismatched file fails with one line naming the file instead of training on garbage.

nanoGPT's ``data/<name>/train.bin`` and ``val.bin`` (raw uint16, no header) are read the same way:
their header is synthesized from the file size and ``meta.pkl`` beside them (its ``vocab_size``;
without one, GPT-2's 50257 ids with end-of-text 50256, as nanoGPT assumes). ``meta.pkl`` is read with
an unpickler that builds plain containers only, so a file that would construct objects is refused.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.atomic import atomic_open

MAGIC = b"PODTOKEN"
TOKEN_SUFFIX = ".tok"
TOKEN_SUFFIXES = (TOKEN_SUFFIX,)
NANOGPT_SUFFIX = ".bin"
NANOGPT_META = "meta.pkl"
GPT2_VOCAB, GPT2_EOT = 50257, 50256
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQQ")


class TokenShardError(ValueError):
    """A token shard is malformed; the message names the file and the problem."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id in ``[0, vocab_size)``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class TokenShardHeader:
    num_tokens: int
    vocab_size: int
    eot_id: int
    itemsize: int
    version: int = VERSION

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.itemsize == 2 else np.dtype(np.uint32)

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, self.version, self.itemsize, self.num_tokens, self.vocab_size, self.eot_id)
        return raw.ljust(HEADER_SIZE, b"\0")


class _PlainUnpickler(pickle.Unpickler):
    """Dicts, lists, strings and numbers only: nanoGPT's meta.pkl needs nothing else."""

    def find_class(self, module: str, name: str) -> None:
        raise pickle.UnpicklingError(f"refusing to construct {module}.{name}")


def nanogpt_vocab(directory: str | Path) -> int | None:
    """``vocab_size`` from nanoGPT's ``meta.pkl`` in ``directory``; None without the file."""
    path = Path(directory) / NANOGPT_META
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            meta = _PlainUnpickler(fh).load()
        return int(meta["vocab_size"])
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise TokenShardError(f"{path}: not a nanoGPT meta.pkl with a vocab_size ({exc})") from None


def _nanogpt_header(path: Path) -> TokenShardHeader:
    size = path.stat().st_size
    if size % 2:
        raise TokenShardError(f"{path}: {size} bytes is not a whole number of uint16 tokens (nanoGPT .bin)")
    vocab = nanogpt_vocab(path.parent)
    return TokenShardHeader(num_tokens=size // 2, vocab_size=vocab or GPT2_VOCAB, eot_id=GPT2_EOT if vocab is None else 0,
                            itemsize=2, version=0)


def read_header(path: str | Path) -> TokenShardHeader:
    """Read and validate the header of ``path`` against the file's actual size (nanoGPT ``.bin``: synthesize it)."""
    path = Path(path)
    if path.suffix == NANOGPT_SUFFIX:
        return _nanogpt_header(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_SIZE)
    except OSError as exc:
        raise TokenShardError(f"{path}: cannot read token shard: {exc.strerror}") from exc
    if len(raw) < HEADER_SIZE:
        raise TokenShardError(f"{path}: truncated token shard header ({len(raw)} of {HEADER_SIZE} bytes)")
    magic, version, itemsize, n, vocab, eot = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise TokenShardError(f"{path}: not a token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise TokenShardError(f"{path}: unsupported token shard version {version} (this reader knows {VERSION})")
    if itemsize not in (2, 4):
        raise TokenShardError(f"{path}: bad token dtype itemsize {itemsize} (expected 2 or 4)")
    if itemsize == 2 and vocab > 2**16:
        raise TokenShardError(f"{path}: uint16 tokens cannot hold a vocabulary of {vocab}")
    expected = HEADER_SIZE + n * itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise TokenShardError(f"{path}: size {actual} bytes does not match header ({n} tokens -> {expected} bytes)")
    return TokenShardHeader(num_tokens=n, vocab_size=vocab, eot_id=eot, itemsize=itemsize, version=version)


def open_tokens(path: str | Path, vocab_size: int | None = None) -> np.memmap:
    """Memory-map the tokens of ``path`` after validating its header.

    With ``vocab_size`` given, a shard written for a larger vocabulary is refused (its ids would
    index past the model's embedding).
    """
    header = read_header(path)
    if vocab_size is not None and header.vocab_size > vocab_size:
        raise TokenShardError(
            f"{path}: written for a vocabulary of {header.vocab_size}, larger than model.vocab_size={vocab_size}"
        )
    if header.num_tokens == 0:
        return np.zeros(0, dtype=header.dtype)  # type: ignore[return-value]
    offset = 0 if Path(path).suffix == NANOGPT_SUFFIX else HEADER_SIZE
    return np.memmap(path, dtype=header.dtype, mode="r", offset=offset, shape=(header.num_tokens,))


def check_token_ids(path: str | Path, vocab_size: int, chunk: int = 1 << 24, label: str = "vocab_size") -> None:
    """Scan every id of ``path`` (a max per memory-mapped chunk, 2.6 GB/s per core from the page
    cache: bench/id_scan.py); raise naming the file, the first bad id and its position if one is at
    or above ``vocab_size`` (called ``label``)."""
    tokens = open_tokens(path)
    for start in range(0, len(tokens), chunk):
        block = tokens[start : start + chunk]
        if len(block) and int(block.max()) >= vocab_size:
            bad = start + int(np.argmax(block >= vocab_size))
            raise TokenShardError(f"{path}: token id {int(tokens[bad])} at position {bad} >= {label} {vocab_size}")


class TokenShardWriter:
    """Stream token arrays into a shard; the file appears under its real name only on ``close``.

    The header's token count is written last, so a killed writer leaves only a temporary.
    """

    def __init__(self, path: str | Path, vocab_size: int, eot_id: int) -> None:
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.eot_id = eot_id
        self.dtype = dtype_for_vocab(vocab_size)
        self.num_tokens = 0
        self._ctx = atomic_open(self.path, "wb")
        try:
            self._fh = self._ctx.__enter__()
            self._fh.write(b"\0" * HEADER_SIZE)
        except OSError as exc:
            if hasattr(self, "_fh"):
                self.abort()
            raise self._write_error(exc) from None

    def write(self, tokens: np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size and (int(arr.max()) >= self.vocab_size or int(arr.min()) < 0):
            raise TokenShardError(f"{self.path}: token id out of range [0, {self.vocab_size})")
        try:
            self._fh.write(arr.astype(self.dtype, copy=False).tobytes())
        except OSError as exc:
            raise self._write_error(exc) from None
        self.num_tokens += int(arr.size)

    def close(self) -> TokenShardHeader:
        header = TokenShardHeader(self.num_tokens, self.vocab_size, self.eot_id, self.dtype.itemsize)
        try:
            self._fh.seek(0)
            self._fh.write(header.pack())
            self._fh.flush()
            self._ctx.__exit__(None, None, None)
        except OSError as exc:
            self.abort()
            raise self._write_error(exc) from None
        return header

    def _write_error(self, exc: OSError) -> TokenShardError:
        """A failed write (a full disk) names the shard being written, not the input being read."""
        return TokenShardError(f"{self.path}: cannot write token shard: {exc.strerror or exc}")

    def abort(self) -> None:
        """Discard everything written so far; the real name is never created."""
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_token_shard(path: str | Path, tokens: np.ndarray, vocab_size: int, eot_id: int) -> TokenShardHeader:
    """Write a whole token array as one shard (tests and small tools)."""
    with TokenShardWriter(path, vocab_size, eot_id) as writer:
        writer.write(tokens)
    return read_header(path)
