"""``orchestrate sft prepare``: the fine-tuning datasets of seed 004 as canonical JSONL.

    orchestrate sft prepare --stages instruct tool reasoning [--instruct-limit N] [--tool-limit N]
        [--reasoning-limit N] [--experiment NAME] [--workspace ROOT | --out DIR]
        [--source NAME[/CONFIG]=PATH ...] [--file STAGE=PATH ...] [--no-hub]
    orchestrate sft init --tokenizer BASE_BUNDLE --checkpoint CKPT_DIR/TAG --out DIR

Writes ``instruct_data.jsonl``, ``tool_data.jsonl``, ``reasoning_data.jsonl`` and ``report.json``
to ``<workspace>/datasets/sft/<experiment>`` (where ``orchestrate --stages ...,instruct,...``
reads them). ``--source`` reads a seed-004 source from a local .jsonl/.parquet file in its own
schema instead of the hub; ``--file`` adds a JSONL already in a canonical format; ``--no-hub``
reads only those. A rerun resumes: sources already converted with the same inputs are skipped.
``sft init`` is what the pipeline does before its first SFT stage, for a hand-run ``train``: the
chat tokenizer bundle (``DIR/tokenizer``) and the checkpoint with rows for the chat tokens
(``DIR/init/final``), then prints the config keys that use them.
Exit codes: 0 done, 2 bad flags or inputs, 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from orchestrator.workspace import Layout, LayoutError
from training.sft.prepare import PrepareError, PrepareOptions, parse_file_flags, parse_source_flags, prepare

EXIT_USAGE = 2
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Fine-tuning data (seed 004): `orchestrate sft prepare --help`.")


def sft_dir(layout: Layout) -> Path:
    """Where a workspace keeps an experiment's canonical SFT files."""
    return layout.root / "datasets" / "sft" / layout.experiment


def _fail(message: str) -> None:
    print(f"orchestrate sft: error: {message}", file=sys.stderr)
    raise typer.Exit(EXIT_USAGE)


@app.callback()
def _group() -> None:
    """Fine-tuning data (seed 004)."""


@app.command("prepare")
def prepare_command(
    stages: List[str] = typer.Option(["instruct", "tool", "reasoning"], "--stages", help="instruct tool reasoning (several after one flag)"),
    instruct_limit: Optional[int] = typer.Option(None, "--instruct-limit", min=1, help="records kept for instruct (split evenly over its sources)"),
    tool_limit: Optional[int] = typer.Option(None, "--tool-limit", min=1, help="records kept for tool"),
    reasoning_limit: Optional[int] = typer.Option(None, "--reasoning-limit", min=1, help="records kept for reasoning"),
    experiment: str = typer.Option("podtrain", "--experiment", envvar="RUN_EXPERIMENT", help="names the output folder"),
    mode: str = typer.Option("local", "--mode", help="cloud (/workspace) or local (./workspace)"),
    workspace: Optional[Path] = typer.Option(None, "--workspace", help="workspace root"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default <workspace>/datasets/sft/<experiment>)"),
    source: Optional[List[str]] = typer.Option(None, "--source", help="NAME[/CONFIG]=PATH: a source read from a local file in its own schema"),
    file: Optional[List[str]] = typer.Option(None, "--file", help="STAGE=PATH: your own JSONL in a canonical format"),
    no_hub: bool = typer.Option(False, "--no-hub", help="read only --source/--file inputs, nothing from the hub"),
) -> None:
    """Convert seed 004's sources (or local stand-ins) into canonical records, deduplicated, resumable."""
    stage_list = [s for item in stages for s in item.replace(",", " ").split()]
    try:
        if out is None:
            if mode not in ("cloud", "local"):
                _fail(f"--mode {mode!r}: expected cloud or local")
            out = sft_dir(Layout.for_mode(mode, experiment, workspace))
        opts = PrepareOptions(out_dir=out, stages=stage_list,
                              limits={"instruct": instruct_limit, "tool": tool_limit, "reasoning": reasoning_limit},
                              local=parse_source_flags(list(source or [])), user_files=parse_file_flags(list(file or [])),
                              hub=not no_hub)
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            prepare(opts, say=lambda line: print(line, flush=True))
        finally:
            signal.signal(signal.SIGTERM, previous)
    except (PrepareError, LayoutError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print("orchestrate sft: interrupted; run the same command again to resume", file=sys.stderr)
        raise typer.Exit(130) from None


@app.command("init")
def init_command(
    tokenizer: Path = typer.Option(..., "--tokenizer", help="the pretraining tokenizer bundle (artifacts/tokenizer/<experiment>)"),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="the pretrained checkpoint: a tag path (ckpt/final) or its folder (final)"),
    out: Path = typer.Option(..., "--out", help="writes OUT/tokenizer and OUT/init/final"),
) -> None:
    """Chat tokenizer bundle + the checkpoint resized for its tokens: the start of a hand-run SFT stage."""
    from training.checkpoint import CheckpointError, tag_path
    from training.sft.resize import resize_checkpoint
    from training.sft.template import TemplateError, write_chat_bundle
    from training.tokenizer_bundle import TokenizerError

    directory, tag = (checkpoint, "final") if checkpoint.is_dir() else (checkpoint.parent, tag_path(checkpoint).name)
    try:
        chat = write_chat_bundle(tokenizer, out / "tokenizer")
        start = resize_checkpoint(directory, tag, out / "init", chat.vocab_size, chat.vocab_size - len(chat.ids), sorted(chat.ids.values()))
    except (TemplateError, TokenizerError, CheckpointError) as exc:
        _fail(str(exc))
    print(f"stage: instruct  init_from: {start}  tokenizer_path: {chat.directory}  model.vocab_size: {chat.vocab_size} (or more)")
