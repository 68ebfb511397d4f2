"""Train, reuse or import the byte-level BPE tokenizer bundle of an experiment.

A bundle is a directory holding ``tokenizer.json`` (the ``tokenizers`` library's own format,
loadable by ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``) and ``meta.json``
(format version 1: vocabulary size, special ids, the tokenizer's sha256, the fingerprint of the
text shard manifests it was trained on, training settings, library version). ``meta.json`` is
written last, so a directory without it is an unfinished bundle and is trained again.

Design choices, and why:

- Byte-level BPE with a GPT-4/Llama-3 style split regex (digits in groups of at most three),
  no normalizer, a byte-level decoder and ``ignore_merges``: every UTF-8 text round-trips, and
  the result is exactly reproducible by ``tiktoken`` (see ``orchestrator.tokenizer.tiktoken_bpe``), which
  the encode stage uses for speed.
- ``<|endoftext|>`` and ``<|pad|>`` are added after training, so they take the last two ids and
  merged tokens keep ids in merge order (what tiktoken's ranks require).
- Training reads documents through an iterator, a prefix of every shard up to an even share of
  a byte cap: BPE training keeps every word and pair in memory (tokenizers#1170), so the sample,
  not the corpus, bounds memory.
- The vocabulary size recorded is the full id space (max id + 1, added tokens included), the
  number the token dtype and the model's embedding must cover.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from sharder.manifest import ManifestError, load_manifest
from sharder.textshard import TextShardError, read_documents
from training.atomic import atomic_write_bytes, atomic_write_json
from training.heartbeat import Heartbeat
from training.tokenizer_bundle import (
    EOT_TOKEN, META_FILE, PAD_TOKEN, SPECIAL_TOKENS, TOKENIZER_FILE, TokenizerBundle, TokenizerError, configure_parallelism,
)

# Llama-3's split (cl100k family without possessive quantifiers), which both the Oniguruma
# engine of `tokenizers` and tiktoken's fancy-regex evaluate identically.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BATCH_DOCS = 1000  # documents handed to the Rust trainer per iterator step


def prepare_tokenizer(
    text_dirs: list[Path],
    bundle_dir: Path,
    vocab_size: int,
    *,
    tokenizer_json: Path | None = None,
    sample_bytes: int = 2_000_000_000,
    min_frequency: int = 2,
    console=None,
) -> tuple[TokenizerBundle, str]:
    """Return the experiment's tokenizer bundle and how it was obtained.

    Status is ``"imported"`` (``tokenizer_json`` given: a tokenizer.json file or a directory
    holding one, copied byte for byte), ``"reused"`` (``bundle_dir`` already holds a bundle
    trained on the same shards with the same settings, or an earlier import) or ``"trained"``.
    A bundle trained on other shards or settings is refused rather than silently reused.
    """
    bundle_dir = Path(bundle_dir)
    if tokenizer_json is not None:
        bundle = _import(Path(tokenizer_json), bundle_dir, vocab_size)
        _say(console, f"tokenizer: imported {tokenizer_json} -> {bundle_dir} (vocab {bundle.vocab_size})")
        return bundle, "imported"
    check_tokenizer_choice(None, vocab_size)

    manifest_fp = manifests_fingerprint(text_dirs)
    settings = {
        "algorithm": "byte-level-bpe",
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "sample_bytes": sample_bytes,
        "split_pattern": SPLIT_PATTERN,
        "special_tokens": list(SPECIAL_TOKENS),
    }
    if (bundle_dir / META_FILE).exists():
        bundle = TokenizerBundle.load(bundle_dir)
        _check_reusable(bundle, manifest_fp, settings, vocab_size)
        _say(console, f"tokenizer: reusing {bundle_dir} (fingerprint {bundle.fingerprint[:12]}, vocab {bundle.vocab_size})")
        return bundle, "reused"
    bundle = _train(text_dirs, bundle_dir, settings, manifest_fp, console)
    return bundle, "trained"


def manifests_fingerprint(text_dirs: list[Path]) -> str:
    """The manifest fingerprint of one shard directory, or a hash over several in order."""
    if not text_dirs:
        raise TokenizerError("no text shard directory given to train the tokenizer on")
    try:
        prints = [load_manifest(d).fingerprint() for d in text_dirs]
    except ManifestError as exc:
        raise TokenizerError(str(exc)) from None
    if len(prints) == 1:
        return prints[0]
    return hashlib.sha256("\n".join(prints).encode()).hexdigest()


def _check_reusable(bundle: TokenizerBundle, manifest_fp: str, settings: dict[str, Any], vocab_size: int) -> None:
    where = bundle.directory
    if bundle.vocab_size > vocab_size:
        raise TokenizerError(f"{where}: tokenizer has {bundle.vocab_size} ids, more than vocab_size={vocab_size}")
    if bundle.origin == "imported":
        return  # an explicit earlier choice; it was not trained on these shards
    if bundle.manifest_fingerprint != manifest_fp:
        raise TokenizerError(
            f"{where}: stale tokenizer, trained on shards with manifest fingerprint {bundle.manifest_fingerprint} "
            f"but the shards now have {manifest_fp}; remove {where} to retrain or pass --tokenizer-json"
        )
    changed = [f"{k} {bundle.settings.get(k)!r} -> {v!r}" for k, v in settings.items() if bundle.settings.get(k) != v]
    if changed:
        raise TokenizerError(f"{where}: tokenizer was trained with other settings ({'; '.join(changed)}); remove {where} to retrain")


def sample_documents(text_dirs: list[Path], sample_bytes: int, stats: dict[str, int]) -> Iterator[list[str]]:
    """Batches of documents: a prefix of every shard, each taking an even share of what is left of the cap.

    A shard smaller than its share leaves the rest to the shards after it; ``stats`` counts the
    documents and UTF-8 bytes handed out.
    """
    try:
        paths = [p for d in text_dirs for p in load_manifest(d).shard_paths(d)]
    except ManifestError as exc:
        raise TokenizerError(str(exc)) from None
    left = sample_bytes
    heartbeat = Heartbeat("tokenizer", "bytes sampled")  # boot.sh's watchdog (the merges that follow are not tracked)
    for i, path in enumerate(paths):
        budget = left // (len(paths) - i)
        taken = 0
        batch: list[str] = []
        try:
            for doc in read_documents(path):
                size = len(doc.encode("utf-8"))
                if taken + size > budget:
                    break
                taken += size
                stats["bytes"] += size
                batch.append(doc)
                if len(batch) == _BATCH_DOCS:
                    stats["documents"] += len(batch)
                    heartbeat.beat(stats["bytes"])
                    yield batch
                    batch = []
        except TextShardError as exc:  # already names the file and line
            raise TokenizerError(str(exc)) from None
        except OSError as exc:
            raise TokenizerError(f"{path}: cannot read text shard: {exc.strerror or exc}") from None
        if batch:
            stats["documents"] += len(batch)
            heartbeat.beat(stats["bytes"])
            yield batch
        left -= taken


def _train(text_dirs: list[Path], bundle_dir: Path, settings: dict[str, Any], manifest_fp: str, console) -> TokenizerBundle:
    configure_parallelism()
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(settings["split_pattern"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings["vocab_size"] - len(SPECIAL_TOKENS),
        min_frequency=settings["min_frequency"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats = {"documents": 0, "bytes": 0}
    start = time.perf_counter()
    batches = sample_documents(text_dirs, settings["sample_bytes"], stats)
    with _sample_progress(console, settings["sample_bytes"], stats) as tracked:
        tok.train_from_iterator(tracked(batches), trainer=trainer)
    seconds = time.perf_counter() - start
    if stats["bytes"] == 0:
        raise TokenizerError(f"no text to train the tokenizer on in {', '.join(map(str, text_dirs))}")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    data = tok.to_str().encode("utf-8")
    bundle = TokenizerBundle(
        directory=bundle_dir,
        vocab_size=_id_space(tok),
        eot_id=tok.token_to_id(EOT_TOKEN),
        pad_id=tok.token_to_id(PAD_TOKEN),
        fingerprint=hashlib.sha256(data).hexdigest(),
        manifest_fingerprint=manifest_fp,
        origin="trained",
        settings=settings,
        library={"tokenizers": tokenizers.__version__},
    )
    _write_bundle(bundle, data, training={"documents": stats["documents"], "bytes": stats["bytes"], "seconds": round(seconds, 3)})
    _say(
        console,
        f"tokenizer: trained vocab {bundle.vocab_size} on {stats['documents']:,} documents "
        f"({stats['bytes'] / 1e6:,.1f} MB) in {seconds:,.1f} s -> {bundle_dir}",
    )
    return bundle


@contextlib.contextmanager
def _sample_progress(console, total: int, stats: dict[str, int]):
    """Yield a wrapper for the batch iterator that advances a rich bar over the sampled bytes."""
    if console is None:
        yield lambda batches: batches
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("tokenizer: counting pairs in sample", total=total)

        def tracked(batches: Iterator[list[str]]) -> Iterator[list[str]]:
            for batch in batches:
                yield batch
                progress.update(task, completed=stats["bytes"])
            progress.update(task, total=stats["bytes"], completed=stats["bytes"], description="tokenizer: computing merges")

        yield tracked


def check_tokenizer_choice(tokenizer_json: Path | None, vocab_size: int) -> None:
    """What :func:`prepare_tokenizer` would refuse, checked without writing anything: orchestrate
    calls it when it plans, before any stage (a bad --tokenizer-json must not wait for sharding)."""
    if tokenizer_json is not None:
        _read_import(Path(tokenizer_json), vocab_size)
    elif vocab_size < 256 + len(SPECIAL_TOKENS) + 1:  # training one: every byte, the special tokens and a merge
        raise TokenizerError(f"vocab_size={vocab_size} is too small for a byte-level BPE (at least 259)")


def _import(source: Path, bundle_dir: Path, vocab_size: int) -> TokenizerBundle:
    """Copy a tokenizer.json (or a Hugging Face tokenizer directory's) into a bundle."""
    source, data, ids, eot_id, pad_id = _read_import(source, vocab_size)
    bundle = TokenizerBundle(
        directory=bundle_dir,
        vocab_size=ids,
        eot_id=eot_id,
        pad_id=pad_id,
        fingerprint=hashlib.sha256(data).hexdigest(),
        manifest_fingerprint=None,
        origin="imported",
        settings={"source": str(source.resolve())},
        library={"tokenizers": tokenizers.__version__},
    )
    _write_bundle(bundle, data, training=None)
    return bundle


def _read_import(source: Path, vocab_size: int) -> tuple[Path, bytes, int, int, int]:
    """(tokenizer.json path, its bytes, id space, end-of-text id, pad id) of an import, validated."""
    config: dict[str, Any] = {}
    if source.is_dir():
        config_path = source / "tokenizer_config.json"
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise TokenizerError(f"{config_path}: unreadable: {exc}") from None
        source = source / TOKENIZER_FILE
    try:
        data = source.read_bytes()
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"--tokenizer-json {source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"--tokenizer-json {source}: unreadable: {exc}") from None
    except Exception as exc:  # the Rust parser raises a bare Exception
        raise TokenizerError(f"--tokenizer-json {source}: not a tokenizers tokenizer.json: {exc}") from None
    ids = _id_space(tok)
    if ids > vocab_size:
        raise TokenizerError(f"--tokenizer-json {source}: tokenizer has {ids} ids, more than vocab_size={vocab_size}")
    eot_id = _special_id(tok, [EOT_TOKEN, _token_name(config.get("eos_token"))], source, "end-of-text")
    pad_name = _token_name(config.get("pad_token"))
    pad_id = _special_id(tok, [PAD_TOKEN, pad_name], source, "pad", default=eot_id)
    return source, data, ids, eot_id, pad_id


def _token_name(entry: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    return entry.get("content") if isinstance(entry, dict) else entry


def _special_id(tok: Tokenizer, names: list[str | None], source: Path, role: str, default: int | None = None) -> int:
    for name in names:
        if name is not None and tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    if default is not None:
        return default
    raise TokenizerError(
        f"--tokenizer-json {source}: no {role} token ({EOT_TOKEN}, or eos_token in tokenizer_config.json beside it)"
    )


def _id_space(tok: Tokenizer) -> int:
    """max id + 1: get_vocab_size() counts entries, which undercounts when ids are sparse."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _write_bundle(bundle: TokenizerBundle, tokenizer_bytes: bytes, training: dict[str, Any] | None) -> None:
    """tokenizer.json first, meta.json last: meta's presence marks a whole bundle."""
    bundle.directory.mkdir(parents=True, exist_ok=True)
    (bundle.directory / META_FILE).unlink(missing_ok=True)
    atomic_write_bytes(bundle.tokenizer_json, tokenizer_bytes)
    meta = bundle.to_meta()
    if training is not None:
        meta["training"] = training
    atomic_write_json(bundle.directory / META_FILE, meta)


def _say(console, message: str) -> None:
    if console is not None:
        console.print(message)
