"""Every token id of a run's shards checked on a background thread, from the first step on.

The loader checks a shard when it first reads from it (``TokenStream.read_rows``), which is too late
for a shard the run reaches after hours: on a GPU an id past the embedding is a device-side assert
at that point, on a CPU a short run may never read it and exit 0. So the trainer starts this scan
next to the first step: it walks every shard of ``train_data`` and ``val_data`` (a max per
memory-mapped chunk, 2.6 GB/s per core from the page cache: docs/performance.md) while training
runs, and the loop, which looks at :attr:`IdScan.failed` once per step, stops with one line naming
the file and the id. Shards the scan has cleared are marked in the stream, so the loader does not
check them again.

On several ranks the shards are dealt out (rank ``r`` takes every ``world``-th), so a node's ranks
do not each read and reduce the whole corpus: the loop agrees once per step whether any rank found
a bad id (every rank then stops on that rank's line) and whether every rank has finished, after
which all shards count as cleared everywhere.
"""

from __future__ import annotations

import threading

from training.data import TokenStream
from training.token_shards import TokenShardError, check_token_ids


class IdScan:
    """Scan this rank's part of ``streams``' shards for ids at or above their vocabulary, on a daemon thread."""

    def __init__(self, streams: list[TokenStream], rank: int = 0, world_size: int = 1) -> None:
        self.streams = streams
        self.rank, self.world_size = rank, world_size
        self.error: TokenShardError | None = None
        self.clean = False  # this rank's whole part scanned, nothing found (a read error leaves it False)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="token-id-scan", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            shards = [(stream, index, path) for stream in self.streams for index, path in enumerate(stream.paths)]
            for stream, index, path in shards[self.rank::self.world_size]:
                if index not in stream.checked:
                    check_token_ids(path, stream.vocab_size, label="model.vocab_size")
                    stream.checked.add(index)
            self.clean = True
        except TokenShardError as exc:
            self.error = exc
        finally:
            self._done.set()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def wait(self) -> None:
        """Until this rank's part is scanned (the end of a run that finished before the scan did)."""
        self._done.wait()

    @property
    def found(self) -> str | None:
        """What this rank's part has found so far, as the line to stop on (no waiting for the rest)."""
        return None if self.error is None else str(self.error)

    def cleared_everywhere(self) -> None:
        """Every rank's part is :attr:`clean`: no shard needs the loader's check again on this rank."""
        for stream in self.streams:
            stream.checked.update(range(len(stream.paths)))

    @staticmethod
    def raise_first(found: list[str | None]) -> None:
        """Raise the first bad id any rank found, so every rank stops on the same line."""
        for message in found:
            if message is not None:
                raise TokenShardError(message)
