"""``train [CONFIG | --config CONFIG] [key=value ...] [--resume PATH|auto] [--dry-run]``.

Seed 004's ``scripts/pretrain.py`` flags are accepted as aliases: ``--preset NAME`` (the config),
``--tokenizer``, ``--processed-dir``, ``--output-dir``, ``--run-name``, ``--batch-size``,
``--grad-accum``, ``--learning-rate``, ``--seq-len``, ``--save-steps``, ``--save-total-limit``,
``--disable-eval``, ``--active-expert``, ``--expert-checkpoint-dir`` (training/seed004_flags.py).

With no arguments at all, a numbered menu of presets on rank 0 (a terminal, or one line piped on
stdin); with neither, a clear error instead of waiting for input that never comes (CI, a pod's boot
script). With ``key=value`` overrides but no config, nanoGPT's ``train.py`` defaults
(``configs/gpt2_124m.yaml``), as ``python train.py batch_size=32`` starts from them (seed 001).

A seed 000 JSON preset with a ``data:`` section has its data prepared first, through the
orchestrator's pipeline (shard, tokenizer, encode; each skipped when done), so ``train PRESET.json``
is the seed's one command. Imports flow orchestrator -> training and never back; this entry point
is the one place that crosses, and only lazily, inside the function that needs it
(:func:`_prepare_preset_data`): everything else in ``training`` runs without the orchestrator
being imported, and ``python -m training`` is what torchrun and the orchestrator both launch.

Exit codes: 0 done, 1 an error while running (a checkpoint that cannot be written), 2 bad config,
flags or data, 3 diverged, 130/143 stopped by SIGINT/SIGTERM. An error is one line on stderr,
printed by rank 0 only when every rank hits it (the usual case: all ranks read the same config and
shards), so a 2-rank run does not print it twice.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import List, Optional

import typer
import yaml
from rich.console import Console

from training.checkpoint import CheckpointError, NoSuchCheckpoint
from training.config import CONFIG_SUFFIXES, ConfigError, TrainConfig, load_config
from training.distributed import RankError
from training.hf import HFError
from training.init import InitError, resolve_config
from training.presets import NANOGPT_DEFAULTS, PresetError, has_data_section, prepare_for_all_ranks

EXIT_ERROR = 1
EXIT_USAGE = 2
RANK_ERROR_GRACE_S = 5.0  # torchrun's monitor (0.1 s interval) stops a rank this long after rank 0 failed
app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False, rich_markup_mode=None)


def _launched_rank() -> int:
    return int(os.environ.get("RANK", 0)) if "LOCAL_RANK" in os.environ else 0


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    """One line on stderr and exit ``code``; under torchrun rank 0 speaks for all.

    Another rank waits first: when rank 0 failed the same way, torchrun stops this rank during the
    wait and the line is not repeated; an error of this rank alone is still printed, with its rank.
    """
    rank = _launched_rank()
    if rank != 0:
        time.sleep(RANK_ERROR_GRACE_S)
        message = f"rank {rank}: {message}"
    print(f"train: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _check_wandb(cfg: TrainConfig) -> None:
    """wandb is an optional extra: say how to get it instead of failing at the first log line."""
    if cfg.use_wandb and importlib.util.find_spec("wandb") is None:
        _fail("use_wandb: the wandb package is not installed; pip install -e '.[wandb]' (or set use_wandb=false)")


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
    config: Optional[str] = typer.Argument(None, help="YAML, JSON or TOML config; omit for nanoGPT's defaults "
                                           "(configs/gpt2_124m.yaml), or omit everything for the preset menu"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, dotted for nested keys"),
    config_option: Optional[str] = typer.Option(None, "--config", help="the config, as a flag (seed 002's `train -- --config FILE`)"),
    resume: Optional[str] = typer.Option(None, "--resume", help="checkpoint tag path, a directory, or 'auto'"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config, parameter count and GPU memory plan, then exit"),
) -> None:
    overrides = list(overrides or [])
    if config is not None and "=" in config and not config.lower().endswith(CONFIG_SUFFIXES):
        overrides.insert(0, config)
        config = None
    if config_option is not None:
        if config is not None:
            _fail(f"--config {config_option} and {config}: give the config once")
        config = config_option
    console = Console(highlight=False, soft_wrap=True)
    is_main = _launched_rank() == 0
    notes: list[str] = []
    try:
        if config is None and overrides:
            config = str(NANOGPT_DEFAULTS)
            notes.append(f"no config given: nanoGPT's train.py defaults from {NANOGPT_DEFAULTS}")
        elif config is None:
            from training.presets import pick_preset_for_all_ranks

            config = str(pick_preset_for_all_ranks())
        if has_data_section(config) and not dry_run:
            prepare_for_all_ranks(lambda: _prepare_preset_data(config, console))
        cfg = resolve_config(load_config(config, overrides, notes))
    except (ConfigError, PresetError, InitError, HFError) as exc:  # HFError: an init_from hub id not fetched
        _fail(str(exc))
    _check_wandb(cfg)
    if is_main:
        console.print(f"config {config}" + (f" with {' '.join(overrides)}" if overrides else ""), markup=False)
        for note in notes:
            console.print(note, markup=False)
        console.print(yaml.safe_dump(cfg.to_plain(), sort_keys=False).rstrip(), markup=False)
        console.print(describe(cfg), markup=False)
    if dry_run:
        import torch

        from training.memory_plan import plan_line

        world = int(os.environ.get("WORLD_SIZE", 1)) if "LOCAL_RANK" in os.environ else 1
        device = torch.device("cuda" if cfg.device.startswith(("auto", "cuda")) and torch.cuda.is_available() else "cpu")
        try:
            _, line = plan_line(cfg, world, None, device)
        except ValueError as exc:  # auto_micro_batch with no budget: the run would stop on the same line
            _fail(str(exc), EXIT_USAGE)
        if is_main:
            console.print(line, markup=False)
        return
    from training.trainer import train

    try:
        result = train(cfg, config_path=config, resume=resume, console=console)
    except RankError as exc:  # agreed across ranks: printed once, by the rank that knows
        if exc.speaks:
            print(f"train: error: {exc}", file=sys.stderr, flush=True)
        exc.said()
        raise typer.Exit(EXIT_USAGE) from None
    except (ValueError, NoSuchCheckpoint) as exc:  # config, data (DataError, TokenShardError), flags
        _fail(str(exc), EXIT_USAGE)
    except CheckpointError as exc:  # a checkpoint that cannot be written or read while running
        _fail(str(exc), EXIT_ERROR)
    raise typer.Exit(result.exit_code)


def _prepare_preset_data(config: str, console: Console) -> None:
    """Seed 000: the preset's ``data:`` through the orchestrator's pipeline, up to its token shards.

    The one import of ``orchestrator`` from ``training``, deferred to here (see the module docstring).
    """
    from orchestrator.preset_data import prepare_preset_data

    prepare_preset_data(config, console)


def main() -> None:
    """``train``: seed 004's pretrain.py flags are translated first (training/seed004_flags.py)."""
    from training.seed004_flags import FlagError, translate

    try:
        args = translate(sys.argv[1:])
    except FlagError as exc:
        print(f"train: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE) from None
    app(args=args, prog_name="train")


if __name__ == "__main__":
    main()
