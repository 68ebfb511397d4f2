"""Seed 001 (nanoGPT) and seed 004 (transformers) key names as aliases, one test per family, and
the keys they brought along: eval_only, always_save_checkpoint, wandb_log with wandb offline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from training import checkpoint as ckpt
from training.cli import app
from training.config import ConfigError, load_config


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump({"train_data": "x"}))
    return path


def test_output_and_logging_names(base) -> None:
    notes: list[str] = []
    cfg = load_config(base, ["out_dir=out", "eval_interval=7", "eval_iters=3", "log_interval=2"], notes)
    assert (cfg.checkpoint_dir, cfg.eval_every, cfg.eval_steps, cfg.log_every) == ("out", 7, 3, 2)
    assert "out_dir (nanoGPT name) set checkpoint_dir = out" in notes
    assert len(notes) == 4


def test_model_shape_names_and_block_size(base) -> None:
    cfg = load_config(base, ["n_layer=6", "n_head=6", "n_embd=384", "block_size=256", "dropout=0.1", "bias=True"])
    m = cfg.model
    assert (m.num_layers, m.attention.n_heads, m.d_model, m.dropout, m.bias) == (6, 6, 384, 0.1, True)
    assert cfg.seq_len == m.max_seq_len == 256  # nanoGPT's block_size is both


def test_optimizer_and_schedule_names_with_absolute_min_lr(base) -> None:
    notes: list[str] = []
    cfg = load_config(base, ["learning_rate=1e-3", "max_iters=100", "warmup_iters=10", "lr_decay_iters=90",
                             "min_lr=1e-4", "weight_decay=0.01", "beta2=0.99", "grad_clip=0.5"], notes)
    assert cfg.optimizer.lr == 1e-3 and cfg.num_steps == 100
    assert (cfg.scheduler.warmup_steps, cfg.scheduler.total_steps) == (10, 90)
    assert cfg.scheduler.min_lr_ratio == pytest.approx(0.1)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.beta2, cfg.optimizer.grad_clip) == (0.01, 0.99, 0.5)
    assert any("min_lr (nanoGPT name) set scheduler.min_lr_ratio = 0.0001 / optimizer.lr 0.001 = 0.1" in n for n in notes)


def test_min_lr_in_the_file_uses_the_overridden_learning_rate(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train_data": "x", "min_lr": 6e-5, "learning_rate": 6e-4}))
    assert load_config(path).scheduler.min_lr_ratio == pytest.approx(0.1)
    assert load_config(path, ["learning_rate=1.2e-3"]).scheduler.min_lr_ratio == pytest.approx(0.05)


def test_decay_lr_compile_backend_device_dtype(base) -> None:
    cfg = load_config(base, ["decay_lr=False", "compile=False", "backend=gloo", "device=cpu", "dtype=float32"])
    assert cfg.scheduler.type == "constant" and cfg.compile_model is False
    assert (cfg.distributed.backend, cfg.device, cfg.dtype) == ("gloo", "cpu", "float32")
    assert load_config(base, ["decay_lr=True"]).scheduler.type == "cosine"


def test_transformers_names(base) -> None:
    cfg = load_config(base, ["per_device_train_batch_size=4", "logging_steps=5", "save_steps=50",
                             "dataloader_num_workers=1", "max_steps=20"])
    assert (cfg.batch_size, cfg.log_every, cfg.save_every, cfg.num_workers, cfg.num_steps) == (4, 5, 50, 1, 20)


def test_an_alias_and_its_canonical_key_must_agree_in_a_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train_data": "x", "learning_rate": 1e-3, "optimizer": {"lr": 2e-3}}))
    with pytest.raises(ConfigError, match=r"learning_rate=0.001 \(nanoGPT name\) and optimizer.lr=0.002 disagree"):
        load_config(path)


def test_init_from_is_a_podtrain_key(base) -> None:
    assert load_config(base, ["init_from=resume"]).init_from == "resume"


def test_seed_001_command_line_as_written(byte_corpus, tmp_path) -> None:
    """The seed's own line, resolved and described (--dry-run: 100 steps of a 10M model is not a unit test)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(byte_corpus, tmp_path)))
    line = ["batch_size=32", "compile=False", "learning_rate=1e-3", "n_layer=6", "n_head=6", "n_embd=384", "max_iters=100"]
    result = CliRunner().invoke(app, [str(path), *line, "wandb_log=True", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "n_embd (nanoGPT name) set model.d_model = 384" in result.output and "use_wandb: true" in result.output


@pytest.mark.slow
def test_wandb_log_runs_with_wandb_offline(byte_corpus, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(byte_corpus, tmp_path)))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "training", str(path), "batch_size=4", "compile=False", "learning_rate=1e-3",
                           "n_layer=1", "max_iters=3", "eval_interval=3", "wandb_log=True", "wandb_run_name=alias-run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # offline mode: the run's records, synced later
    records = run_file.read_bytes()
    assert b"alias-run" in records and b"val_loss" in records and b"cpu_percent" in records


def test_wandb_missing_is_one_line_saying_how_to_install(byte_corpus, tmp_path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(byte_corpus, tmp_path)))
    result = CliRunner().invoke(app, [str(path), "wandb_log=True"])
    assert result.exit_code == 2 and not (tmp_path / "ckpt").exists()
    assert result.stderr.strip() == ("train: error: use_wandb: the wandb package is not installed; "
                                     "pip install -e '.[wandb]' (or set use_wandb=false)")


def test_eval_only_evaluates_the_resumed_weights_and_trains_nothing(byte_corpus, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(byte_corpus, tmp_path, num_steps=10)))
    runner = CliRunner()
    assert runner.invoke(app, [str(path)]).exit_code == 0
    result = runner.invoke(app, [str(path), "eval_only=True", "--resume", "auto"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1].keys() == {"step", "val_loss", "val_ppl"} and rows[-1]["step"] == 10
    assert rows[-1]["val_ppl"] == pytest.approx(math.exp(rows[-1]["val_loss"]))
    assert rows[-1]["val_loss"] == pytest.approx(rows[-2]["val_loss"], abs=1e-6)  # the same weights, the same windows
    assert "step 10 | val loss" in result.output and "(eval_only)" in result.output


def test_always_save_checkpoint_false_keeps_only_improving_saves(byte_corpus, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(byte_corpus, tmp_path, num_steps=20, save_every=5, eval_every=10)))
    result = CliRunner().invoke(app, [str(path), "always_save_checkpoint=False"])
    assert result.exit_code == 0, result.output
    tags = {tag for _, tag in ckpt.list_tags(tmp_path / "ckpt")}
    assert tags == {"best", "final", "latest"}  # no step checkpoints: only the improving evaluations (and the end)
