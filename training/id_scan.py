"""Every token id of a run's shards checked on a background thread, from the first step on.

The loader checks a shard when it first reads from it (``TokenStream.read_rows``), which is too late
for a shard the run reaches after hours: on a GPU an id past the embedding is a device-side assert
at that point, on a CPU a short run may never read it and exit 0. So the trainer starts this scan
next to the first step: it walks every shard of ``train_data`` and ``val_data`` (a max per
memory-mapped chunk, 2.6 GB/s per core from the page cache: docs/performance.md) while training
runs, and the loop, which looks at :attr:`IdScan.failed` once per step, stops with one line naming
the file and the id. Shards the scan has cleared are marked in the stream, so the loader does not
check them again.
"""

from __future__ import annotations

import threading

from training.data import TokenStream
from training.token_shards import TokenShardError, check_token_ids


class IdScan:
    """Scan ``streams``' shards for ids at or above their vocabulary, on a daemon thread."""

    def __init__(self, streams: list[TokenStream]) -> None:
        self.streams = streams
        self.error: TokenShardError | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="token-id-scan", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for stream in self.streams:
                for index, path in enumerate(stream.paths):
                    if index not in stream.checked:
                        check_token_ids(path, stream.vocab_size, label="model.vocab_size")
                        stream.checked.add(index)
        except TokenShardError as exc:
            self.error = exc
        finally:
            self._done.set()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def wait(self) -> None:
        """Until every shard is scanned (the end of a run that finished before the scan did)."""
        self._done.wait()

    def raise_error(self) -> None:
        """Finish scanning, then raise what was found (every rank scans the same shards, in one order)."""
        self.wait()
        if self.error is not None:
            raise self.error
