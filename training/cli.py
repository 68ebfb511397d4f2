"""``train CONFIG [key=value ...] [--resume PATH|auto] [--dry-run]``.

With no config on an interactive terminal, a numbered menu of presets; with no terminal, a clear
error instead of waiting for input that never comes (CI, a pod's boot script).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer
import yaml
from rich.console import Console

from training.checkpoint import CheckpointError
from training.config import CONFIG_SUFFIXES, ConfigError, TrainConfig, load_config
from training.data import DataError
from training.token_shards import TokenShardError

EXIT_USAGE = 2
app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False, rich_markup_mode=None)


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    print(f"train: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def describe(cfg: TrainConfig) -> str:
    """Parameter count, FLOPs per token and a memory floor, from a model on the meta device."""
    from training.model import build_meta_model, count_parameters, flops_per_token
    from training.moe import inactive_parameters

    n = count_parameters(build_meta_model(cfg.model))
    fpt = flops_per_token(cfg.model, cfg.seq_len, n)
    states_gb = n * 16 / 1e9  # fp32 weights + grads + two AdamW moments
    active = n - inactive_parameters(cfg.model)
    return (f"parameters: {n:,} ({n / 1e9:.3f}B)" + (f", active per token: {active:,}" if active != n else "") +
            f" | {fpt / 1e9:.2f} GFLOP/token | "
            f"weights+grads+AdamW states: {states_gb:.1f} GB before activations")


@app.command()
def main_command(
    config: Optional[str] = typer.Argument(None, help="YAML, JSON or TOML config; omit for the preset menu"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, dotted for nested keys"),
    resume: Optional[str] = typer.Option(None, "--resume", help="checkpoint tag path, a directory, or 'auto'"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and parameter count, then exit"),
) -> None:
    overrides = list(overrides or [])
    if config is not None and "=" in config and not config.lower().endswith(CONFIG_SUFFIXES):
        overrides.insert(0, config)
        config = None
    console = Console(highlight=False, soft_wrap=True)
    is_main = int(os.environ.get("RANK", 0)) == 0
    if config is None:
        if not (sys.stdin.isatty() and sys.stdout.isatty()) or int(os.environ.get("WORLD_SIZE", 1)) > 1:
            _fail("no config given and no terminal to choose a preset; run `train configs/m3_medium.yaml` (or another file)")
        from training.presets import choose_preset

        config = str(choose_preset(input, print))
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    if is_main:
        console.print(f"config {config}" + (f" with {' '.join(overrides)}" if overrides else ""), markup=False)
        console.print(yaml.safe_dump(cfg.to_plain(), sort_keys=False).rstrip(), markup=False)
        console.print(describe(cfg), markup=False)
    if dry_run:
        return
    from training.trainer import train

    try:
        result = train(cfg, config_path=config, resume=resume, console=console)
    except (ConfigError, DataError, TokenShardError, CheckpointError, ValueError) as exc:
        _fail(str(exc), 1)
    raise typer.Exit(result.exit_code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
