"""The fine-tuning stages of ``orchestrate --stages pretrain,instruct,tool,reasoning``.

Each SFT stage is one pipeline stage (a completion marker in ``runs/<exp>/stages/<stage>.json``)
that starts from the previous stage's ``final`` checkpoint:

1. the chat tokenizer bundle (base bundle + chat tokens + template) beside the base bundle;
2. the start checkpoint: for the first SFT stage, the pretrained ``final`` with embedding rows for
   the chat tokens (training/sft/resize.py); for later ones, the previous stage's ``final`` as is;
3. ``runs/<exp>/<stage>/training.yaml``: the pipeline's config with ``stage``, the stage's JSONL
   (from ``orchestrate sft prepare``), the chat bundle, ``init_from`` and the stage's folders, then
   the user's overrides, then those prefixed with the stage's name (``instruct.num_steps=500``);
4. the trainer, ``--resume auto``: an interrupted stage continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from orchestrator.launch import PipelineError, TrainingExit, launch_training, training_summary
from orchestrator.sft.cli import sft_dir
from orchestrator.workspace import Layout
from training.checkpoint_tags import list_tags
from training.config import (PRETRAIN_SCHEDULE, SFT_STAGES, ConfigError, TrainConfig, canonical_paths, drop_pretraining_schedule,
                             dump_config, load_config, read_config_file, validate_config)
from training.sft.records import STAGE_FILES



@dataclass(frozen=True)
class StageContext:
    """What an SFT stage takes from the pipeline run (handed in, so this module never imports the pipeline)."""

    layout: Layout
    config_path: Path
    overrides: list[str]
    nproc: int | None
    console: Console

PIPELINE_STAGES = ("pretrain", *SFT_STAGES)
INIT_KEY = "init_from"
VOCAB_KEY = "model.vocab_size"


def parse_stages(spec: str) -> list[str]:
    """``pretrain,instruct,tool`` -> the list, in pipeline order, each known and none repeated."""
    items = [s.strip() for s in spec.replace(" ", ",").split(",") if s.strip()]
    unknown = [s for s in items if s not in PIPELINE_STAGES]
    if unknown or not items:
        raise ValueError(f"--stages {spec!r}: expected a comma-separated subset of {','.join(PIPELINE_STAGES)}")
    if len(set(items)) != len(items) or items != sorted(items, key=PIPELINE_STAGES.index):
        raise ValueError(f"--stages {spec!r}: each stage once, in the order {','.join(PIPELINE_STAGES)}")
    return items


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Overrides for every run, and per SFT stage those written ``<stage>.key=value`` (prefix removed)."""
    common: list[str] = []
    per_stage: dict[str, list[str]] = {s: [] for s in SFT_STAGES}
    for item in overrides:
        head, dot, rest = item.partition(".")
        if dot and head in per_stage and "=" in rest:
            per_stage[head].append(rest)
        else:
            common.append(item)
    return common, per_stage


def chat_bundle_dir(layout: Layout) -> Path:
    return layout.tokenizer.with_name(layout.tokenizer.name + ".chat")


def stage_dir(layout: Layout, stage: str) -> Path:
    """A stage's run folder: the experiment's own for pretraining, a sub-folder per SFT stage."""
    return layout.run if stage == "pretrain" else layout.run / stage


def finished(checkpoints: Path, config: Path) -> bool:
    """``final`` exists at the configured number of steps."""
    try:
        target = load_config(config).num_steps
    except ConfigError:
        return False
    return any(tag == "final" and step >= target for step, tag in list_tags(checkpoints))


def sft_stage_inputs(ctx: StageContext, stage: str, previous: dict[str, Any]) -> dict[str, Any]:
    data = sft_dir(ctx.layout) / STAGE_FILES[stage]
    ident = (str(data), data.stat().st_size, data.stat().st_mtime_ns) if data.exists() else str(data)
    common, per_stage = split_overrides(ctx.overrides)  # another stage's overrides do not redo this one
    return {"previous": previous, "data": ident, "config": ctx.config_path.read_text(encoding="utf-8"),
            "overrides": common + per_stage[stage]}


def _sets_vocab(item: str) -> bool:
    return VOCAB_KEY in canonical_paths(item)  # an alias's targets too


def check_sft_inputs(layout: Layout, stages: list[str], overrides: list[str]) -> None:
    """Before any work: each requested SFT stage's prepared file holds records, and no override sets
    the vocabulary an SFT stage takes from its chat bundle and start checkpoint.

    A common ``model.vocab_size=N`` is the pretraining model's (the SFT stages then add the chat
    tokens to it); without a pretrain stage, or as ``<stage>.model.vocab_size``, it can only
    contradict the checkpoint the stage starts from, which would fail hours later.
    """
    sft = [s for s in stages if s != "pretrain"]
    if not sft:
        return
    common, per_stage = split_overrides(overrides)
    owned = [f"{stage}.{item}" for stage in sft for item in per_stage[stage] if _sets_vocab(item)]
    if "pretrain" not in stages:
        owned = [item for item in common if _sets_vocab(item)] + owned
    if owned:
        raise PipelineError(f"{owned[0]}: an SFT stage's model.vocab_size is the one its start checkpoint has (the pretrained "
                            f"model's, grown by the chat tokens); drop the override (a plain model.vocab_size=N with "
                            f"--stages pretrain,... sizes the pretraining model)")
    for stage in sft:
        data = sft_dir(layout) / STAGE_FILES[stage]
        hint = f"run orchestrate sft prepare --stages {stage} --experiment {layout.experiment} --workspace {layout.root} first"
        if not data.is_file():
            raise PipelineError(f"{stage}: {data} missing; {hint}")
        if not data.stat().st_size:
            raise PipelineError(f"{stage}: {data} holds no record; {hint}")


def _start_vocab(start: Path) -> int:
    """The vocabulary of the checkpoint a stage starts from (its config, written beside the weights)."""
    return int(json.loads(Path(f"{start}.config.json").read_text(encoding="utf-8"))["model"]["vocab_size"])


def stage_config(ctx: StageContext, stage: str, data: Path, chat_dir: Path, start: Path) -> TrainConfig:
    """The stage's training config: the pipeline's config without its pretraining schedule (lr,
    warmup: the stage takes seed 004's unless ``<stage>.optimizer.lr=...`` gives its own), the
    stage's data, chat bundle, start checkpoint (whose vocabulary it takes) and folders, then the overrides."""
    common, per_stage = split_overrides(ctx.overrides)
    pretrain_only = [o for o in common if set(canonical_paths(o)) & set(PRETRAIN_SCHEDULE)]
    for item in pretrain_only:
        ctx.console.print(f"[stage] {stage}: {item} applies to pretraining; give the stage its own with {stage}.{item}", markup=False)
    notes: list[str] = []
    raw = drop_pretraining_schedule(read_config_file(ctx.config_path), str(ctx.config_path), stage, notes)
    for note in notes:
        ctx.console.print(f"[stage] {stage}: {note}", markup=False)
    raw.pop("val_data", None)
    run = stage_dir(ctx.layout, stage)
    raw.update({"stage": stage, "train_data": str(data), "tokenizer_path": str(chat_dir),
                "checkpoint_dir": str(run / "checkpoints"), "tensorboard_dir": str(run / "tensorboard"), INIT_KEY: str(start)})
    raw.setdefault("model", {})["vocab_size"] = _start_vocab(start)  # owned by the stage: check_sft_inputs refused overrides of it
    overrides = [item for item in common if not _sets_vocab(item) and item not in pretrain_only] + per_stage[stage]
    return validate_config(raw, str(ctx.config_path), overrides)


def run_sft_stage(ctx: StageContext, stage: str, previous_stage: str) -> dict[str, Any]:
    """Steps 1-4 above; returns the stage summary (the trainer's last throughput)."""
    from training.sft.resize import resize_checkpoint
    from training.sft.template import TemplateError, write_chat_bundle

    L = ctx.layout
    data = sft_dir(L) / STAGE_FILES[stage]
    try:
        chat = write_chat_bundle(L.tokenizer, chat_bundle_dir(L))
    except TemplateError as exc:
        raise PipelineError(f"{stage}: {exc}") from None
    prev_ckpt = stage_dir(L, previous_stage) / "checkpoints"
    if not any(tag == "final" for _, tag in list_tags(prev_ckpt)):
        raise PipelineError(f"{stage}: no final checkpoint in {prev_ckpt} (the {previous_stage} stage has not finished)")
    run = stage_dir(L, stage)
    start = prev_ckpt / "final"
    if previous_stage == "pretrain":  # the first SFT stage: rows for the chat tokens
        base_vocab = chat.vocab_size - len(chat.ids)
        start = resize_checkpoint(prev_ckpt, "final", run / "init", chat.vocab_size, base_vocab, sorted(chat.ids.values()))
    cfg = stage_config(ctx, stage, data, chat.directory, start)
    dump_config(cfg, run / "training.yaml")
    code = launch_training(run / "training.yaml", ctx.nproc, ctx.console)
    if code != 0:
        raise TrainingExit(code)
    return training_summary(cfg)
