"""``fineweb-sharder`` (and ``python -m sharder``): the command line over ``sharder.pipeline``.

Exit codes: 0 done (or already complete), 2 user error (one line on stderr), 130 stopped by SIGINT,
143 stopped by SIGTERM (directories consistent; re-run the same command to resume).
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from sharder.argv import spread_multi_value_flags
from sharder.errors import EXIT_USER_ERROR, ShardError, ShardInterrupted
from sharder.options import MODES

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
INPUT_FLAGS = ("--input", "-i")


Mode = Enum("Mode", {mode: mode for mode in MODES}, type=str)  # the choices typer shows and checks


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def shard(
    mode: Annotated[Mode, typer.Option(help="smoke: stop after --take docs; prod: the whole source; split: train+val.")] = Mode("smoke"),
    split: Annotated[str, typer.Option(help="Output split of smoke/prod runs (directory datasets/<split>/<experiment>).")] = "train",
    lines_per_shard: Annotated[int, typer.Option(help="Documents per shard.")] = 50_000,
    take: Annotated[Optional[int], typer.Option(help="Stop after this many documents [default: 10000 in smoke mode, no limit otherwise].")] = None,
    val_ratio: Annotated[float, typer.Option(help="split mode: probability that a document goes to val.")] = 0.01,
    seed: Annotated[int, typer.Option(help="split mode: seed of the train/val routing hash.")] = 0,
    gzip: Annotated[bool, typer.Option("--gzip", help="Write .txt.gz shards.")] = False,
    dataset: Annotated[Optional[str], typer.Option(help="Hugging Face dataset [default: HuggingFaceFW/fineweb unless --input].")] = None,
    name: Annotated[Optional[str], typer.Option(help="Dataset config, e.g. sample-10BT.")] = None,
    source_split: Annotated[str, typer.Option(help="Split of the source dataset to read.")] = "train",
    text_field: Annotated[str, typer.Option(help="Column holding the document text.")] = "text",
    data: Annotated[Optional[Path], typer.Option("--data", help="A data recipe (YAML/JSON, docs/data.md): named and custom sources mixed into one stream.")] = None,
    dataset_limit: Annotated[Optional[str], typer.Option("--dataset-limit", help="With --data: name=N,... documents per source (seed 004), over the recipe's limits.")] = None,
    input: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="Local .parquet/.jsonl[.gz]/.json[.gz]/.txt[.gz] files, globs or directories: several after one --input, or the flag repeated.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="Output directory (split mode: its train/ and val/) [default: <workspace>/datasets/<split>/<experiment>].")] = None,
    experiment: Annotated[str, typer.Option(help="Experiment name in the default output directories.")] = "default",
    min_text_length: Annotated[int, typer.Option(help="Drop documents shorter than this many characters.")] = 1,
    workspace: Annotated[Path, typer.Option(help="Workspace root (HF caches go to <workspace>/hf_cache unless HF_HOME is set).")] = Path("workspace"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the shards and manifest already in the output directories and start over.")] = False,
) -> None:
    """Stream FineWeb (or local files) into resumable, lossless text shards with a manifest.json."""
    from rich.console import Console

    from sharder.pipeline import ShardOptions, run_shard

    console = Console(stderr=True)
    try:
        options = ShardOptions(
            mode=mode.value, split=split, lines_per_shard=lines_per_shard, take=take, val_ratio=val_ratio,
            gzip=gzip, dataset=dataset, name=name, text_field=text_field, input=input, output_dir=output_dir,
            experiment=experiment, min_text_length=min_text_length, workspace=workspace, overwrite=overwrite,
            seed=seed, source_split=source_split, data=data, dataset_limit=dataset_limit,
        )
        run_shard(options, console=console)
    except ShardError as exc:
        console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except ShardInterrupted as exc:
        console.print(str(exc), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C before the run installed its handlers: nothing was written yet
        console.print("interrupted by SIGINT before any shard was written", highlight=False)
        raise typer.Exit(130) from None


def main() -> None:
    # `datasets` imports torch (2 s) when it is installed, only to share a counter with torch
    # DataLoader workers; the sharder has none, so the CLI process opts out before the import.
    os.environ.setdefault("USE_TORCH", "0")
    # `datasets` logs its own copy of every error we report in one line; keep only ours. Set
    # through the environment because `datasets` must not be imported before HF_HOME is chosen.
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    try:
        app(args=spread_multi_value_flags(sys.argv[1:], INPUT_FLAGS), prog_name="fineweb-sharder")
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        # A failed run (its one line already printed) leaves without interpreter teardown: pyarrow's
        # reader threads, stopped mid-read, can otherwise abort the process at exit ("terminate
        # called without an active exception", exit -6) and hide the exit code the user scripts on.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)
