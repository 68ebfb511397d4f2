"""Train/val routing for ``--mode split``: a seeded 64-bit hash of each document's key.

The key is the document's ``id`` when the source has one (FineWeb does), else its text, so the same
document goes to the same side on every run, on every machine and after any resume, and another
``--seed`` draws a different but equally stable split. Nothing here uses Python's ``hash()``, which
is salted per process.

Ids are hashed in bulk with numpy, eight bytes at a time (splitmix64 mixing of each word with its
position and the seed, then of the length): a FineWeb id costs ~0.1 µs instead of ~1.5 µs for a
hashlib call, in a few whole-batch calls that leave the GIL to the encoder threads. Texts (sources
without ids, or a row whose id is null or empty) are long, so they go through blake2b one by one.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from sharder.textshard import binary_offsets

if TYPE_CHECKING:
    import pyarrow as pa

_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_LANES = np.arange(8)
_KEEP = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)  # the low n bytes of a word


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit affects every output bit."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _binary_view(values: "pa.Array") -> tuple["pa.Array", np.ndarray, np.ndarray]:
    """``values`` as binary (zero-copy), its offsets and each string's length (0 for a null)."""
    binary, offsets = binary_offsets(values)
    lengths = np.diff(offsets)
    if binary.null_count:
        lengths[~np.asarray(binary.is_valid())] = 0
    return binary, offsets, lengths


def _xor_of_mixed_words(data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, width: int,
                        position: np.ndarray) -> np.ndarray:
    """Strings of different lengths: gather each string's words, zero the bytes past its end.

    Equal to the fixed-length path's zero padding: a word's unused bytes are masked to zero and a
    word past the end of its string contributes nothing.
    """
    # Padded so that reading 8 bytes from any start stays in bounds.
    data = np.concatenate([data, np.zeros(8 * width, dtype=np.uint8)])
    word_starts = (offsets[:-1] - offsets[0])[:, None] + 8 * np.arange(width)  # (strings, words)
    words = data[word_starts[:, :, None] + _LANES].view("<u8")[:, :, 0]
    remaining = np.clip(lengths[:, None] - 8 * np.arange(width), 0, 8)  # bytes of each word in use
    mixed = np.where(remaining > 0, _mix((words & _KEEP[remaining]) ^ position), np.uint64(0))
    return np.bitwise_xor.reduce(mixed, axis=1)


def hash_strings(values: "pa.Array", seed: int) -> np.ndarray:
    """A keyed 64-bit hash of each string of ``values`` (nulls hash as empty strings).

    Each 8-byte word is mixed with its position and the seed, the words of a string are combined
    by XOR and the result mixed with the length: a fixed, small number of whole-batch numpy calls
    (each releasing the GIL), whatever the batch size or string lengths.
    """
    return _hash_view(*_binary_view(values), seed)


def _hash_view(binary: "pa.Array", offsets: np.ndarray, lengths: np.ndarray, seed: int) -> np.ndarray:
    """hash_strings on what _binary_view returned."""
    count = len(binary)
    salt = np.uint64(seed & _MASK)
    h = salt ^ (lengths.astype(np.uint64) * _GOLDEN)
    width = int(lengths.max() + 7) // 8 if count else 0
    if width:
        position = salt + np.arange(1, width + 1, dtype=np.uint64) * _GOLDEN
        data = np.frombuffer(binary.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        if lengths.min() == lengths.max():  # FineWeb's ids all have one length: a reshape, no gather
            padded = np.zeros((count, 8 * width), dtype=np.uint8)
            padded[:, : lengths[0]] = data.reshape(count, -1)
            h ^= np.bitwise_xor.reduce(_mix(padded.view("<u8") ^ position), axis=1)
        else:
            h ^= _xor_of_mixed_words(data, offsets, lengths, width, position)
    return _mix(h)


class Router:
    """Decides ``val`` with probability ``val_ratio`` from a seeded hash of each document's key."""

    def __init__(self, val_ratio: float, seed: int) -> None:
        self._threshold = min(int(val_ratio * 2.0**64), _MASK)
        self._seed = seed & _MASK
        self._salt = seed.to_bytes(16, "little", signed=True)

    def is_val_text(self, text: bytes) -> bool:
        digest = hashlib.blake2b(text, digest_size=8, key=self._salt).digest()
        return int.from_bytes(digest, "little") < self._threshold

    def to_val(self, rows: np.ndarray, texts: "pa.ChunkedArray", ids: "pa.Array | None") -> np.ndarray:
        """For each row index in ``rows``, whether that document goes to val."""
        import pyarrow as pa

        if ids is not None:
            view = _binary_view(ids)
            flags = _hash_view(*view, self._seed)[rows] < np.uint64(self._threshold)
            # A null or empty id is no key: every one would hash alike and land on the same side.
            no_id = view[2][rows] == 0
        else:
            flags = np.zeros(len(rows), dtype=bool)
            no_id = np.ones(len(rows), dtype=bool)
        if no_id.any():  # keyed by text: one blake2b per document
            large = pa.types.is_large_string(texts.type)
            raw = texts.cast(pa.large_binary() if large else pa.binary()).to_pylist()
            for position in np.flatnonzero(no_id).tolist():
                flags[position] = self.is_val_text(raw[rows[position]])
        return flags

    def split_rows(self, rows: np.ndarray, texts: "pa.ChunkedArray", ids: "pa.Array | None") -> tuple[np.ndarray, np.ndarray]:
        """Partition ``rows`` into (train, val), keeping their order."""
        to_val = self.to_val(rows, texts, ids)
        return rows[~to_val], rows[to_val]
