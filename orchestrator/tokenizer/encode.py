"""Text shards -> token shards, one for one, in parallel, incremental and resumable.

``<text_dir>/shard_00000.txt[.gz]`` becomes ``<out_dir>/shard_00000.tok`` (the format of
``training.token_shards``): every document's ids followed by the end-of-text id, so the
documents of a shard, and of consecutive shards, are separated by it. ``<out_dir>/manifest.json``
(format version 1) lists for each token shard its source shard and that shard's sha256, its
documents, UTF-8 bytes and tokens, and, once for the directory, the tokenizer fingerprint.

Why it is shaped this way:

- Speed: the ids come from a tiktoken Encoding equivalent to the bundle's BPE
  (``orchestrator.tokenizer.tiktoken_bpe``) once it has matched ``tokenizers`` on a sample of the shards
  being encoded; otherwise (or with ``engine="tokenizers"``) from ``encode_batch_fast``. Shards go
  to spawned worker processes (not forked: a fork after the parent used a tokenizer disables its
  thread pool), each writing its own shard in multi-megabyte sequential blocks; when there are
  fewer shards than cores, each worker uses several threads instead.
- Resume: a shard is skipped when the manifest records it with the same source sha256 under the
  same tokenizer fingerprint and the file's header agrees. The manifest is rewritten atomically
  as shards complete; a shard appears under its real name only when whole (``TokenShardWriter``).
  A killed run leaves at most temporaries (removed on the next run) and whole shards the manifest
  may not list yet (encoded again).
- The output directory is derived data owned by this stage: a different tokenizer fingerprint
  re-encodes everything, and ``*.tok`` files that the current plan does not keep are deleted
  first, so a directory glob (what the trainer does) never mixes two tokenizers.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from orchestrator.tokenizer.tiktoken_bpe import IncompatibleTokenizer, build_encoding, first_mismatch
from training.tokenizer_bundle import TokenizerBundle, TokenizerError
from sharder.manifest import Manifest, ManifestError, load_manifest
from sharder.textshard import TextShardError, read_documents
from training.atomic import atomic_write_json, read_versioned_json, remove_stale_temporaries
from training.heartbeat import Heartbeat
from training.token_shards import TOKEN_SUFFIX, TokenShardError, TokenShardWriter, dtype_for_vocab, read_header

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
ENGINES = ("auto", "tiktoken", "tokenizers")
BATCH_CHARS = 2_000_000  # text per encode call and per sequential write (~1-2 MB of tokens)
_MANIFEST_INTERVAL_S = 0.5  # at most two manifest rewrites a second, plus the last one
# Texts that stress the pre-tokenizer's corners, checked on top of the shard sample.
_CORNER_CASES = [
    "", " ", "  leading and trailing  ", "tabs\tand\r\nCRLF\rlone CR\n\n\nblank lines",
    "don't WE'LL it's I'M they've you'd", "1234567 3.14159 1e-9 0x1F 10,000,000",
    "naïve café Ærøskøbing straße İstanbul", "日本語のテキスト 中文文本 한국어", "emoji 👩‍👩‍👧 🇫🇷 ✓",
    "\u00a0non-breaking\u2028line separator\u200bzero width", "<|endoftext|> literal <|pad|>", "x" * 3000,
]


class EncodeError(TokenizerError):
    """The encode stage cannot run or a shard cannot be encoded; one line naming the file."""


@dataclass
class EncodeResult:
    """What this run encoded (skipped shards are not in the counts) and where the directory stands."""

    out_dir: Path
    engine: str
    documents: int
    tokens: int
    bytes_in: int
    seconds: float
    shards_encoded: int
    shards_skipped: int
    total_tokens: int  # the whole directory, skipped shards included
    complete: bool  # every shard of a complete text manifest is encoded

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Task:
    source: str
    target: str
    bundle_dir: str
    engine: str
    threads: int


def token_shard_name(text_shard_name: str) -> str:
    """``shard_00000.txt.gz`` -> ``shard_00000.tok``."""
    stem = text_shard_name.removesuffix(".gz").removesuffix(".txt")
    return stem + TOKEN_SUFFIX


def encode_shards(
    text_dir: Path,
    out_dir: Path,
    bundle: TokenizerBundle,
    *,
    workers: int | None = None,
    engine: str = "auto",
    console=None,
) -> EncodeResult:
    """Encode every shard listed in ``text_dir``'s manifest that ``out_dir`` does not already hold."""
    text_dir, out_dir = Path(text_dir), Path(out_dir)
    if engine not in ENGINES:
        raise EncodeError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    try:
        source = load_manifest(text_dir)
    except ManifestError as exc:
        raise EncodeError(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    entries = _kept_entries(out_dir, source, bundle)
    pending = [s for s in source.shards if s.name not in entries]
    _write_manifest(out_dir, text_dir, source, bundle, entries)
    _remove_unlisted_shards(out_dir, entries)

    start = time.perf_counter()
    chosen = "none"
    done: list[dict[str, Any]] = []
    if pending:
        n_workers = max(1, min(workers or _cpu_count(), len(pending)))
        threads = max(1, _cpu_count() // n_workers)
        sha = {s.name: s.sha256 for s in source.shards}
        last_write = 0.0

        def record(result: dict[str, Any]) -> None:
            nonlocal last_write
            result["source_sha256"] = sha[result["source"]]
            entries[result["source"]] = result
            done.append(result)
            if time.monotonic() - last_write >= _MANIFEST_INTERVAL_S:
                _write_manifest(out_dir, text_dir, source, bundle, entries)
                last_write = time.monotonic()

        with _Workers(n_workers) as pool:  # they start up while the engine is being checked
            chosen = _choose_engine(bundle, engine, [text_dir / s.name for s in pending], console)
            tasks = [_Task(str(text_dir / s.name), str(out_dir / token_shard_name(s.name)), str(bundle.directory), chosen, threads)
                     for s in pending]
            with _EncodeProgress(console, sum(s.lines for s in pending)) as progress:
                pool.run(tasks, progress.advance, record)
    seconds = time.perf_counter() - start
    manifest = _write_manifest(out_dir, text_dir, source, bundle, entries)
    result = EncodeResult(
        out_dir=out_dir,
        engine=chosen,
        documents=sum(r["documents"] for r in done),
        tokens=sum(r["tokens"] for r in done),
        bytes_in=sum(r["bytes_in"] for r in done),
        seconds=seconds,
        shards_encoded=len(done),
        shards_skipped=len(source.shards) - len(pending),
        total_tokens=manifest["totals"]["tokens"],
        complete=manifest["complete"],
    )
    _summary(console, result)
    return result


def load_token_manifest(out_dir: Path) -> dict[str, Any]:
    """The token directory's manifest.json (raises EncodeError when missing or malformed)."""
    return read_versioned_json(Path(out_dir) / MANIFEST_NAME, MANIFEST_VERSION,
                               "no token manifest (run the encode stage first)", EncodeError)


def _kept_entries(out_dir: Path, source: Manifest, bundle: TokenizerBundle) -> dict[str, dict[str, Any]]:
    """Entries of the previous manifest still valid for this source and tokenizer, keyed by source name."""
    try:
        previous = load_token_manifest(out_dir)
    except EncodeError:
        return {}
    if previous.get("tokenizer", {}).get("fingerprint") != bundle.fingerprint:
        return {}
    wanted = {s.name: s.sha256 for s in source.shards}
    kept = {}
    for entry in previous.get("shards", []):
        src = entry.get("source")
        if src not in wanted or entry.get("source_sha256") != wanted[src]:
            continue
        try:
            header = read_header(out_dir / entry["name"])
        except (TokenShardError, KeyError):
            continue
        if (header.num_tokens, header.vocab_size, header.eot_id) == (entry.get("tokens"), bundle.vocab_size, bundle.eot_id):
            kept[src] = entry
    return kept


def _remove_unlisted_shards(out_dir: Path, entries: dict[str, dict[str, Any]]) -> None:
    keep = {e["name"] for e in entries.values()}
    for path in out_dir.glob("*" + TOKEN_SUFFIX):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _write_manifest(out_dir: Path, text_dir: Path, source: Manifest, bundle: TokenizerBundle,
                    entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rewrite manifest.json with the shards encoded so far, in the text manifest's order."""
    shards = [entries[s.name] for s in source.shards if s.name in entries]
    fields = ("name", "source", "source_sha256", "documents", "bytes_in", "tokens")
    shards = [{k: e[k] for k in fields} for e in shards]
    data = {
        "version": MANIFEST_VERSION,
        "tokenizer": {
            "fingerprint": bundle.fingerprint,
            "bundle": str(bundle.directory),
            "vocab_size": bundle.vocab_size,
            "eot_id": bundle.eot_id,
            "dtype": dtype_for_vocab(bundle.vocab_size).name,
        },
        "source": {"text_dir": str(text_dir), "manifest_fingerprint": source.fingerprint(), "split": source.split},
        "shards": shards,
        "totals": {k: sum(e[k] for e in shards) for k in ("documents", "bytes_in", "tokens")} | {"shards": len(shards)},
        "complete": source.complete and len(shards) == len(source.shards),
    }
    try:
        atomic_write_json(out_dir / MANIFEST_NAME, data)
    except OSError as exc:  # a full disk: name the file being written, not a shard being read
        raise EncodeError(f"{out_dir / MANIFEST_NAME}: cannot write token manifest: {exc.strerror or exc}") from None
    return data


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- engine choice (parent)

def _sample_texts(paths: Sequence[Path], budget_chars: int = 1_000_000, max_shards: int = 8) -> list[str]:
    """Documents from the start of up to ``max_shards`` shards spread over the list."""
    step = max(1, len(paths) // max_shards)
    chosen = list(paths)[::step][:max_shards]
    texts: list[str] = []
    for path in chosen:
        size = 0
        for doc in _read_or_raise(path):
            texts.append(doc)
            size += len(doc)
            if size >= budget_chars // len(chosen):
                break
    return texts


def _choose_engine(bundle: TokenizerBundle, engine: str, paths: Sequence[Path], console) -> str:
    """tiktoken when it reproduces ``tokenizers`` on a sample, else ``tokenizers`` (or an error if forced)."""
    if engine == "tokenizers":
        return engine
    tok = bundle.load_tokenizer()
    try:
        encoding = build_encoding(bundle.tokenizer_json.read_text(encoding="utf-8"))
    except IncompatibleTokenizer as exc:
        return _fallback(engine, f"{bundle.tokenizer_json} cannot be run by tiktoken: {exc}", console)
    vocab_texts = tok.decode_batch([[i] for i in range(bundle.vocab_size)])
    texts = _CORNER_CASES + [t for t in vocab_texts if "\ufffd" not in t] + _sample_texts(paths)
    reference = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    mismatch = first_mismatch(reference, [encoding.encode_ordinary(t) for t in texts], texts)
    if mismatch:
        return _fallback(engine, f"tiktoken and tokenizers disagree on {bundle.tokenizer_json}: {mismatch}", console)
    return "tiktoken"


def _fallback(engine: str, reason: str, console) -> str:
    if engine == "tiktoken":
        raise EncodeError(reason)
    if console is not None:
        console.print(f"[yellow]encode: {reason}; using tokenizers (slower)[/]")
    return "tokenizers"


def _read_or_raise(path: Path):
    try:
        yield from read_documents(path)
    except TextShardError as exc:  # already names the file and line
        raise EncodeError(str(exc)) from None
    except OSError as exc:
        raise EncodeError(f"{path}: cannot read text shard: {exc.strerror or exc}") from None


# ---------------------------------------------------------------- workers

class _Workers:
    """Spawned worker processes fed from one task queue, reporting on one event queue.

    Hand-rolled rather than a Pool: a crashed worker (OOM kill) must surface as an error instead
    of a hang, and an interrupt or error must stop every worker at once.
    """

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.todo, self.events = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, args=(self.todo, self.events, os.getpid()), daemon=True,
                                  name=f"encode-{i}") for i in range(n)]

    def __enter__(self) -> "_Workers":
        for proc in self.procs:
            proc.start()
        return self

    def run(self, tasks: list[_Task], on_progress: Callable[[int, int, int], None],
            on_done: Callable[[dict[str, Any]], None]) -> None:
        for task in tasks:
            self.todo.put(task)
        for _ in self.procs:
            self.todo.put(None)
        remaining = len(tasks)
        while remaining:
            try:
                kind, payload = self.events.get(timeout=0.2)
            except queue.Empty:
                crashed = [p for p in self.procs if p.exitcode not in (None, 0)]
                if crashed:
                    raise EncodeError(
                        f"encode worker {crashed[0].name} exited with code {crashed[0].exitcode} before finishing "
                        "(killed? out of memory? a calling script without `if __name__ == '__main__':`?); rerun to resume"
                    ) from None
                continue
            if kind == "progress":
                on_progress(*payload)
            elif kind == "done":
                remaining -= 1
                on_done(payload)
            else:
                raise EncodeError(payload)
        for proc in self.procs:
            proc.join()

    def __exit__(self, *exc) -> None:
        """Stop whatever still runs: SIGTERM lets a worker discard its partial shard, SIGKILL if it hangs."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=3)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _worker_main(todo, events, parent_pid: int) -> None:
    """Encode shards from ``todo`` until a None arrives; report progress, results and errors.

    Once the loop is left, SIGTERM kills again: the parent stops every worker after an error, and a
    SystemExit raised inside the interpreter's exit handlers (the queue's flush) printed an
    "Exception ignored in atexit callback" traceback before the error's one line.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us...
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # ...with SIGTERM, which unwinds the shard writer
    try:
        _work(todo, events, parent_pid)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _work(todo, events, parent_pid: int) -> None:
    """The loop of :func:`_worker_main`: one task at a time, the first error reported and the worker done."""
    loaded: dict[tuple[str, str, int], tuple[TokenizerBundle, Callable[[list[str]], list[list[int]]]]] = {}
    while (task := todo.get()) is not None:
        try:
            key = (task.bundle_dir, task.engine, task.threads)
            if key not in loaded:
                bundle = TokenizerBundle.load(task.bundle_dir)
                loaded[key] = bundle, _make_encoder(bundle, task.engine, task.threads)
            result = _encode_file(task, *loaded[key], events, parent_pid)
        except (ValueError, OSError) as exc:  # user-facing: bad shard, full disk, ...
            named = task.source in str(exc) or task.target in str(exc)  # a write error names the output shard
            events.put(("error", str(exc) if named else f"{task.source}: {exc}"))
            return
        except SystemExit:
            return
        except BaseException:
            events.put(("error", f"{task.source}: unexpected failure\n{traceback.format_exc()}"))
            return
        events.put(("done", result))


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _make_encoder(bundle: TokenizerBundle, engine: str, threads: int) -> Callable[[list[str]], list[list[int]]]:
    if engine == "tiktoken":
        encoding = build_encoding(bundle.tokenizer_json.read_text(encoding="utf-8"))
        if threads == 1:
            return lambda docs: [encoding.encode_ordinary(d) for d in docs]
        return lambda docs: encoding.encode_ordinary_batch(docs, num_threads=threads)
    # The Rust pool reads these on first use, which happens after this point in a fresh process.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    tok = bundle.load_tokenizer()
    return lambda docs: [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]


def _encode_file(task: _Task, bundle: TokenizerBundle, encode: Callable[[list[str]], list[list[int]]],
                 events, parent_pid: int) -> dict[str, Any]:
    """Encode one text shard into one token shard; a failure or orphaning leaves no visible file."""
    dtype = dtype_for_vocab(bundle.vocab_size)
    eot = bundle.eot_id
    counts = {"documents": 0, "bytes_in": 0, "tokens": 0}

    def flush(docs: list[str], writer: TokenShardWriter) -> None:
        if os.getppid() != parent_pid:
            raise SystemExit("parent exited")  # orphaned by a killed parent: abort, leave only a temporary
        ids = encode(docs)
        for row in ids:
            row.append(eot)
        total = sum(map(len, ids))
        writer.write(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=total))
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        counts["documents"] += len(docs)
        counts["bytes_in"] += n_bytes
        counts["tokens"] += total
        events.put(("progress", (len(docs), n_bytes, total)))

    with TokenShardWriter(task.target, bundle.vocab_size, eot) as writer:
        batch: list[str] = []
        size = 0
        for doc in read_documents(task.source):
            batch.append(doc)
            size += len(doc)
            if size >= BATCH_CHARS:
                flush(batch, writer)
                batch, size = [], 0
        if batch:
            flush(batch, writer)
    return {"name": Path(task.target).name, "source": Path(task.source).name} | counts


# ---------------------------------------------------------------- progress and summary

class _EncodeProgress:
    """A rich bar over documents with tokens/s and MB/s; silent without a console."""

    def __init__(self, console, total_documents: int) -> None:
        self.console, self.total = console, total_documents
        self.progress = None
        self.tokens = self.bytes = 0
        self.start = time.perf_counter()
        self.heartbeat = Heartbeat("encode", "bytes")  # boot.sh's watchdog: bytes encoded are progress

    def __enter__(self) -> "_EncodeProgress":
        if self.console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("encode"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("encode", total=self.total, rate="")
        return self

    def advance(self, documents: int, n_bytes: int, tokens: int) -> None:
        self.tokens += tokens
        self.bytes += n_bytes
        self.heartbeat.beat(self.bytes)
        if self.progress is not None:
            dt = max(time.perf_counter() - self.start, 1e-9)
            rate = f"{self.tokens / dt / 1e6:,.2f} M tok/s  {self.bytes / dt / 1e6:,.1f} MB/s"
            self.progress.update(self.task, advance=documents, rate=rate)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def _summary(console, result: EncodeResult) -> None:
    if console is None:
        return
    from rich.table import Table

    table = Table(title=f"encode -> {result.out_dir}", show_header=False)
    for key, value in [
        ("shards encoded / skipped", f"{result.shards_encoded} / {result.shards_skipped}"),
        ("engine", result.engine),
        ("documents", f"{result.documents:,}"),
        ("tokens", f"{result.tokens:,}"),
        ("text", f"{result.bytes_in / 1e6:,.1f} MB"),
        ("time", f"{result.seconds:,.1f} s"),
        ("throughput", f"{result.tokens_per_s / 1e6:,.2f} M tok/s, {result.mb_per_s:,.1f} MB/s"),
        ("directory tokens", f"{result.total_tokens:,}" + ("" if result.complete else " (incomplete)")),
    ]:
        table.add_row(key, value)
    console.print(table)
