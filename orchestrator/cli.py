"""``orchestrate``: the whole pipeline in one command, plus the sub-commands below (pods, tokenizer, evaluate, sample, export, sft).

    orchestrate --mode cloud|local --input PATH... --experiment NAME --train-shard-lines N
                [--validation PATH...] [--reuse-shards] [--tokenizer-json PATH] [--config CONFIG]
                [--workspace ROOT] [--dry-run] [--stop-after STAGE] [--stages pretrain,instruct,tool,reasoning]
                [key=value ...] [instruct.key=value ...]

Environment knobs (the pod's): RUN_EXPERIMENT (--experiment), RUN_CONFIG (--config), RUN_SHARD
(auto, the default: shard the inputs when given, else reuse the experiment's shards; 1: shard the
inputs; 0: reuse existing shards), SHARD_LINES (--train-shard-lines), RUN_STAGES (--stages).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from orchestrator.pipeline import Pipeline, PipelineError, PipelineOptions
from orchestrator.sft.stages import parse_stages
from orchestrator.stages import STAGE_NAMES, StageFailed, summary_table
from sharder.argv import spread_multi_value_flags

EXIT_USAGE = 2
# name -> (module, Typer attribute, command inside it or None for the whole group, flags taking several values).
# Imported on first use: `orchestrate --mode local` never pays for the RunPod SDK or transformers.
SUBCOMMANDS: dict[str, tuple[str, str, str | None, tuple[str, ...]]] = {
    "pod": ("orchestrator.pods.cli", "app", None, ()),
    "volume": ("orchestrator.pods.cli", "volume_app", None, ()),
    "tokenizer": ("orchestrator.tokenizer.cli", "app", None, ()),
    "sft": ("orchestrator.sft.cli", "app", None, ("--stages", "--source", "--file")),
    "evaluate": ("orchestrator.use_cli", "app", "evaluate", ()),
    "sample": ("orchestrator.use_cli", "app", "sample", ()),
    "export": ("orchestrator.use_cli", "app", "export", ()),
}
PIPELINE = "pipeline"


class OrchestrateGroup(TyperGroup):
    """The ``orchestrate`` group: sub-commands as Typer groups, loaded lazily, and the pipeline by default.

    ``orchestrate --mode cloud --input a b c key=value`` (the seed's form) has no sub-command name, so
    a first word that names none runs ``pipeline``; flags that take several values (``--input a b c``)
    are spread into repeated flags before Click parses them.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *SUBCOMMANDS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return super().get_command(ctx, name)
        module, attr, command, _ = SUBCOMMANDS[name]
        group = typer.main.get_command(getattr(importlib.import_module(module), attr))
        return group.commands[command] if command else group  # type: ignore[attr-defined]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] in SUBCOMMANDS:
            args = [args[0], *spread_multi_value_flags(args[1:], SUBCOMMANDS[args[0]][3])]
        elif not args or args[0] not in (PIPELINE, *ctx.help_option_names):
            args = [PIPELINE, *spread_multi_value_flags(args, ("--input", "--validation"), lambda token: "=" in token)]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=OrchestrateGroup, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help=__doc__ + "\nWithout a sub-command, the arguments go to `orchestrate pipeline`. Sub-commands: "
                  "pod and volume (RunPod), tokenizer, evaluate|sample|export (docs/evaluate.md), sft (docs/finetune.md).")


@app.callback()
def _orchestrate() -> None:
    """The group itself does nothing: every command is a sub-command (``pipeline`` by default)."""

def _run_shard_env() -> bool | None:
    """RUN_SHARD: True (1), False (0), or None (auto, also when unset or empty)."""
    value = os.environ.get("RUN_SHARD") or "auto"
    if value not in ("auto", "0", "1"):
        print(f"orchestrate: error: RUN_SHARD={value!r}: expected auto, 0 or 1", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    return None if value == "auto" else value == "1"


@app.command(PIPELINE)
def pipeline(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides written into the emitted training config"),
    mode: str = typer.Option("local", "--mode", help="cloud (/workspace, HF caches enforced) or local (./workspace)"),
    inputs: Optional[List[str]] = typer.Option(None, "--input", help="text/jsonl/parquet files or globs, or hf:OWNER/DATASET[/CONFIG]; several after one --input, or the flag repeated"),
    data: Optional[str] = typer.Option(None, "--data", help="a data recipe (docs/data.md): mixed sources, dedup and filters"),
    dataset_limit: Optional[str] = typer.Option(None, "--dataset-limit", help="with --data: name=N,... documents per source (seed 004), over the recipe's limits"),
    experiment: Optional[str] = typer.Option(None, "--experiment", envvar="RUN_EXPERIMENT", help="names every per-run folder"),
    train_shard_lines: int = typer.Option(250_000, "--train-shard-lines", envvar="SHARD_LINES", help="documents per text shard"),
    validation: Optional[List[str]] = typer.Option(None, "--validation", help="a separate validation corpus (else a split by --val-ratio); several paths as for --input"),
    reuse_shards: bool = typer.Option(False, "--reuse-shards", help="keep the existing shard folders (no sharding)"),
    tokenizer_json: Optional[str] = typer.Option(None, "--tokenizer-json", help="reuse this tokenizer.json (or HF tokenizer folder)"),
    config: Optional[str] = typer.Option(None, "--config", envvar="RUN_CONFIG", help="base training config (default by mode)"),
    workspace: Optional[Path] = typer.Option(None, "--workspace", help="workspace root (default /workspace or ./workspace)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and touch nothing"),
    stop_after: str = typer.Option("train", "--stop-after", help=f"last stage to run: {', '.join(STAGE_NAMES)}"),
    val_ratio: float = typer.Option(0.01, "--val-ratio", help="validation share when no --validation is given"),
    take: Optional[int] = typer.Option(None, "--take", help="stop sharding after this many documents"),
    gzip: bool = typer.Option(False, "--gzip", help="write .txt.gz text shards"),
    text_field: str = typer.Option("text", "--text-field", help="column holding the document text"),
    tokenizer_sample_gb: float = typer.Option(2.0, "--tokenizer-sample-gb", help="text sampled to train the tokenizer"),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1,
                                                 help="training processes (default: one per GPU); more than one runs torchrun"),
    stages: str = typer.Option("pretrain", "--stages", envvar="RUN_STAGES",
                               help="pretrain,instruct,tool,reasoning (a subset, in order); SFT stages read orchestrate sft prepare's files"),
) -> None:
    """The whole pipeline: layout -> shard -> tokenizer -> emit -> train, each stage skipped when done.

    RUN_SHARD=0 reuses the shards already in the workspace (as --reuse-shards), RUN_SHARD=1 shards
    --input, RUN_SHARD=auto (the default) shards --input when given, else reuses the shards there.
    Also: `orchestrate pod|volume --help` (RunPod), `orchestrate tokenizer --help`,
    `orchestrate evaluate|sample|export --help` (docs/evaluate.md), `orchestrate sft --help` (docs/finetune.md).
    """
    if mode not in ("cloud", "local"):
        print(f"orchestrate: error: --mode {mode!r}: expected cloud or local", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    shard_env = _run_shard_env()
    try:
        stage_list = parse_stages(stages)
    except ValueError as exc:
        print(f"orchestrate: error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    shard = False if reuse_shards else shard_env  # None: auto, decided by Pipeline from the workspace
    console = Console(highlight=False, soft_wrap=True)
    opts = PipelineOptions(mode=mode, inputs=list(inputs or []), validation=list(validation or []), experiment=experiment,
                           train_shard_lines=train_shard_lines, shard=shard, tokenizer_json=tokenizer_json, config=config,
                           workspace=workspace, stop_after=stop_after, overrides=list(overrides or []), val_ratio=val_ratio,
                           take=take, gzip=gzip, text_field=text_field, tokenizer_sample_bytes=int(tokenizer_sample_gb * 1e9),
                           nproc=nproc_per_node, data=data, dataset_limit=dataset_limit, stages=stage_list)
    try:
        pipe = Pipeline(opts, console)
        console.print(f"orchestrate: mode {mode}, experiment {pipe.layout.experiment}, workspace {pipe.layout.root}, "
                      f"config {pipe.config_path}", markup=False)
        if (note := opts.config_note()) is not None:
            console.print(f"orchestrate: {note}", markup=False)
        records = pipe.run(dry_run=dry_run)
    except PipelineError as exc:
        print(f"orchestrate: error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    except StageFailed as exc:
        print(f"orchestrate: error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code)
    console.print(summary_table(records, "plan (dry run: nothing touched)" if dry_run else "pipeline summary"))


def main() -> None:
    app(prog_name="orchestrate")


if __name__ == "__main__":
    main()
