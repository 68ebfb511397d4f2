"""``orchestrate tokenizer train|encode``: the tokenizer and token-shard stages as commands.

Also runnable on its own: ``python -m orchestrator.tokenizer.cli train|encode ...``.
User errors (a missing manifest, a stale tokenizer, a corrupt shard, a full disk) print one
line and exit 1; an interrupt exits 130 and the next run resumes.
"""

from __future__ import annotations

import contextlib
import re
import signal
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console

from orchestrator.tokenizer.encode import ENGINES, encode_shards
from orchestrator.tokenizer.bpe import prepare_tokenizer
from training.tokenizer_bundle import TokenizerBundle, TokenizerError

app = typer.Typer(
    help="Train, reuse or import the BPE tokenizer; encode text shards into token shards.",
    no_args_is_help=True,
    add_completion=False,
)
RAW_DIR = "data/raw"  # seed 004's train_tokenizer.py scans it when no --files is given
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``2G``, ``500MB``, ``123456`` -> bytes (decimal units, as in MB/s figures)."""
    match = _SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a size like 2000000000, 500M or 2G")
    number, unit = match.groups()
    return int(float(number) * 1000 ** " kmgt".index(unit.lower() or " "))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _user_errors(console: Console) -> Iterator[None]:
    """One line for a user error; SIGTERM (a spot pod's notice) unwinds like Ctrl-C so workers stop cleanly."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    except (TokenizerError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to resume")
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def shard_files(patterns: list[str], text_dir: Path, console: Console) -> Path:
    """Raw files (seed 004's ``--files "data/raw/**/*.txt"``: .txt lines, .jsonl/.parquet ``text``) as
    text shards in ``text_dir``, through the sharder, so the tokenizer trains on them like on the
    pipeline's shards and records their manifest fingerprint (a rerun on the same files reuses it)."""
    from sharder.errors import ShardError
    from sharder.options import ShardOptions
    from sharder.pipeline import run_shard

    try:
        run_shard(ShardOptions(input=patterns, mode="prod", split="train", output_dir=text_dir, overwrite=True), console=console)
    except ShardError as exc:
        raise TokenizerError(str(exc).replace("--input", "--files", 1)) from None
    return text_dir


@app.command()
def train(
    text_dir: Optional[list[Path]] = typer.Option(None, "--text-dir", help="Text shard directory (repeatable): the train split."),
    files: Optional[list[str]] = typer.Option(None, "--files", help="Raw files instead: a path, directory or glob (repeatable; "
                                              "quote it: '**' is expanded here); sharded into BUNDLE_DIR.text/ first."),
    bundle_dir: Path = typer.Option(..., "--bundle-dir", "--output", help="Where tokenizer.json and meta.json live."),
    vocab_size: int = typer.Option(32000, "--vocab-size", help="model.vocab_size: the tokenizer may not have more ids (seed 004's presets: 32000)."),
    tokenizer_json: Optional[Path] = typer.Option(
        None, "--tokenizer-json", help="Use this tokenizer.json, or a local Hugging Face tokenizer directory, instead of training."
    ),
    sample_bytes: str = typer.Option("2G", "--sample-bytes", help="Cap on the text read for training, spread evenly over shards."),
    min_frequency: int = typer.Option(2, "--min-frequency", help="Least count for a pair to be merged."),
) -> None:
    """Train the tokenizer on the text shards (or raw --files), or reuse / import one."""
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    with _user_errors(console):
        if not text_dir and not files and tokenizer_json is None and Path(RAW_DIR).is_dir():
            console.print(f"tokenizer: no --text-dir or --files: training on the files under {RAW_DIR}/ (seed 004's default)")
            files = [f"{RAW_DIR}/**/*.txt"]
        if bool(text_dir) == bool(files) and tokenizer_json is None:
            raise TokenizerError("give the text to train on: --text-dir SHARDS (from the sharder) or --files GLOB (raw files), not both")
        dirs = list(text_dir or [])
        if files:
            dirs = [shard_files(list(files), bundle_dir.with_name(bundle_dir.name + ".text"), console)]
        bundle, status = prepare_tokenizer(
            dirs, bundle_dir, vocab_size, tokenizer_json=tokenizer_json,
            sample_bytes=parse_size(sample_bytes), min_frequency=min_frequency, console=console,
        )
        console.print(f"tokenizer {status}: {bundle.directory} (vocab {bundle.vocab_size}, eot {bundle.eot_id}, "
                      f"sha256 {bundle.fingerprint[:12]})")


@app.command()
def encode(
    text_dir: Path = typer.Option(..., "--text-dir", help="Text shard directory with its manifest.json."),
    out_dir: Path = typer.Option(..., "--out-dir", help="Token shard directory (derived data, owned by this stage)."),
    bundle_dir: Path = typer.Option(..., "--bundle-dir", help="Tokenizer bundle made by `train`."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker processes [default: all cores]."),
    engine: str = typer.Option("auto", "--engine", help=f"One of {', '.join(ENGINES)}; auto = tiktoken when it matches."),
) -> None:
    """Encode text shards into token shards, skipping those already done."""
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    with _user_errors(console):
        encode_shards(text_dir, out_dir, TokenizerBundle.load(bundle_dir), workers=workers, engine=engine, console=console)


if __name__ == "__main__":
    app()
