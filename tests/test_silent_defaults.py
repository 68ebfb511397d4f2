"""Issue 24's two silent wrongs: an SFT stage must not fine-tune at the pretraining learning rate,
and ``--experiment runpod-2b`` must not train the 1B config under the 2B name."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.pipeline import PROJECT_ROOT, PipelineOptions
from orchestrator.sft.stages import StageContext, stage_config
from orchestrator.workspace import Layout
from training.config import SFT_LR, load_config, validate_config

DENSE_75M = PROJECT_ROOT / "configs" / "dense_75m.yaml"


def _instruct(tmp_path: Path, overrides: list[str]) -> tuple[object, str]:
    out = io.StringIO()
    ctx = StageContext(Layout.for_mode("local", "x", tmp_path), DENSE_75M, overrides, 1, Console(file=out, width=300))
    (tmp_path / "init").mkdir(exist_ok=True)
    (tmp_path / "init" / "final.config.json").write_text(json.dumps({"model": {"vocab_size": 32005}}))  # the start checkpoint's
    cfg = stage_config(ctx, "instruct", tmp_path / "instruct_data.jsonl", tmp_path / "chat", tmp_path / "init" / "final")
    return cfg, out.getvalue()


def test_the_pipelines_sft_stage_takes_seed_004s_lr_and_warmup_not_the_pretraining_configs(tmp_path: Path) -> None:
    base = load_config(DENSE_75M)
    assert (base.optimizer.lr, base.scheduler.warmup_steps) == (6e-4, 2000)  # what the stage used to inherit
    cfg, said = _instruct(tmp_path, ["num_steps=1000", "optimizer.lr=1e-3", "learning_rate=2e-3"])
    assert cfg.optimizer.lr == SFT_LR == 1e-5
    assert cfg.scheduler.warmup_steps == math.ceil(0.03 * 1000) == 30
    assert cfg.num_steps == 1000  # other common overrides still reach the stage
    assert "optimizer.lr=0.0006 is the pretraining value; stage instruct uses its own" in said
    assert "[stage] instruct: optimizer.lr=1e-3 applies to pretraining; give the stage its own with instruct.optimizer.lr=1e-3" in said
    assert "learning_rate=2e-3 applies to pretraining" in said


def test_a_stage_given_its_own_lr_and_warmup_keeps_them(tmp_path: Path) -> None:
    cfg, _ = _instruct(tmp_path, ["instruct.optimizer.lr=2e-5", "instruct.scheduler.warmup_steps=7", "tool.optimizer.lr=9e-5"])
    assert (cfg.optimizer.lr, cfg.scheduler.warmup_steps) == (2e-5, 7)


def test_a_pretraining_file_turned_into_a_stage_by_hand_drops_its_schedule_but_a_stage_config_keeps_its_own() -> None:
    notes: list[str] = []
    pretrain_file = {"train_data": "x.jsonl", "tokenizer_path": "chat", "num_steps": 200,
                     "optimizer": {"lr": 6e-4, "weight_decay": 0.1}, "scheduler": {"warmup_steps": 2000}}
    cfg = validate_config(dict(pretrain_file), "dense.yaml", ["stage=instruct"], notes)
    assert (cfg.optimizer.lr, cfg.scheduler.warmup_steps, cfg.optimizer.weight_decay) == (1e-5, 6, 0.1)
    assert any("optimizer.lr=0.0006 is the pretraining value" in n for n in notes)
    cfg = validate_config(dict(pretrain_file), "dense.yaml", ["stage=instruct", "optimizer.lr=3e-5"])
    assert cfg.optimizer.lr == 3e-5  # given on the command line for this stage: kept
    own = validate_config({**pretrain_file, "stage": "instruct"}, "instruct.yaml")
    assert (own.optimizer.lr, own.scheduler.warmup_steps) == (6e-4, 2000)  # the stage's own config: kept


def _orchestrate(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("RUN_CONFIG", "RUN_EXPERIMENT")}
    return subprocess.run([sys.executable, "-m", "orchestrator", "--mode", "local", "--workspace", str(tmp_path / "ws"),
                           "--reuse-shards", "--dry-run", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**environ, **(env or {})})


def test_an_experiment_named_runpod_2b_trains_the_2b_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here: the project's are found
    assert PipelineOptions(experiment="runpod-2b").config_path() == PROJECT_ROOT / "configs" / "runpod_2b.yaml"
    assert PipelineOptions(experiment="runpod-4b").config_path() == PROJECT_ROOT / "configs" / "runpod_4b.yaml"
    assert PipelineOptions(experiment="runpod-7b").config_path() == PROJECT_ROOT / "configs" / "m3_medium.yaml"  # no such file
    assert PipelineOptions(mode="cloud", experiment="mine").config_path() == PROJECT_ROOT / "configs" / "runpod_1b.yaml"
    proc = _orchestrate(tmp_path, "--experiment", "runpod-2b")
    assert proc.returncode == 0, proc.stderr
    assert f"experiment runpod-2b, workspace {tmp_path / 'ws'}, config {PROJECT_ROOT / 'configs' / 'runpod_2b.yaml'}" in proc.stdout
    assert "is the one that runs" not in proc.stdout


def test_an_experiment_and_run_config_of_different_sizes_say_which_config_runs(tmp_path: Path) -> None:
    proc = _orchestrate(tmp_path, env={"RUN_EXPERIMENT": "runpod-2b", "RUN_CONFIG": "configs/runpod_1b.yaml"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "is the one that runs" in line]
    assert lines == [f"orchestrate: experiment runpod-2b is named for a 2B model but config {PROJECT_ROOT / 'configs' / 'runpod_1b.yaml'} "
                     "(1B) is the one that runs; pass --config configs/runpod_2b.yaml (RUN_CONFIG) for the 2B model"]
    same = _orchestrate(tmp_path, "--experiment", "runpod-1b", "--config", "configs/runpod_1b.yaml")
    assert same.returncode == 0 and "is the one that runs" not in same.stdout
