"""The threads that work beside the reader: parallel encoders and one ordered disk thread.

Escaping and compressing a batch, and hashing and writing it, overlap with `datasets` decoding the
next one: pyarrow, zlib, hashlib and file writes release the GIL. Encoding runs on up to 8 threads
in any order; disk jobs (write a part) run one at a time in submission order, and commit jobs
(fsync and rename a shard, rewrite its manifest) in order on a thread of their own, each after the
writes queued before it. So a shard is renamed, and recorded, only after all its writes. The first
failed job stops every later one (a shard whose writes failed is never renamed into place) and is
re-raised in the reader's thread by the next ``submit`` or ``wait``. One Background serves every
output directory of a run.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

ENCODE_THREADS = max(1, min(8, os.cpu_count() or 2))
# Disk jobs (each ~one batch, ~3 MB of text) in flight: enough to keep every encoder busy, and a
# bound on memory when the disk is slower than the stream.
MAX_PENDING = 4 * ENCODE_THREADS + 2


class _Skipped(Exception):
    """A disk job not run because an earlier one failed."""


class Background:
    def __init__(self) -> None:
        self._encoders = ThreadPoolExecutor(max_workers=ENCODE_THREADS, thread_name_prefix="shard-encoder")
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-committer")
        self._pending: collections.deque[Future] = collections.deque()
        self._commits: collections.deque[Future] = collections.deque()
        self._failed = False

    def encode(self, job: Callable[..., Any], *args: Any) -> Future:
        """Run ``job(*args)`` on an encoder thread; its Future is meant for a later disk job."""
        return self._encoders.submit(job, *args)

    def _run(self, job: Callable[..., Any], args: tuple) -> Any:
        if self._failed:
            raise _Skipped
        try:
            return job(*args)
        except BaseException:
            self._failed = True
            raise

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        """Queue disk ``job(*args)``; blocks while MAX_PENDING are queued; raises an earlier job's error."""
        while self._commits and self._commits[0].done():
            self._commits.popleft().result()
        while self._pending and (self._pending[0].done() or len(self._pending) >= MAX_PENDING):
            self._pending.popleft().result()
        self._pending.append(self._disk.submit(self._run, job, args))

    def commit(self, job: Callable[..., Any], *args: Any) -> None:
        """Queue ``job(*args)`` (fsync, rename, manifest) to run after every disk job queued so far.

        It runs on its own ordered thread, so the next shard's writes go on while this one is
        fsynced: the disk streams instead of stopping at every shard boundary.
        """
        self.submit(lambda: self._commits.append(self._committer.submit(self._run, job, args)))

    def wait(self) -> None:
        """Return when every queued job has run; raises the first failure."""
        while self._pending:
            self._pending.popleft().result()
        while self._commits:
            self._commits.popleft().result()

    def close(self) -> None:
        """Run what is queued (up to a failure, after which the rest is skipped), stop the threads.

        Never raises: it is also the clean-up path after an error elsewhere, where the shards already
        complete in the queue should still be renamed and recorded.
        """
        self._disk.shutdown(wait=True)
        self._committer.shutdown(wait=True)
        self._encoders.shutdown(wait=True)
        self._pending.clear()
        self._commits.clear()
