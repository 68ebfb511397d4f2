"""Seed 000: JSON presets beside YAML in the menu, its JSON shape translated (token budgets become
steps), and ``torchrun --nproc_per_node=2 -m training`` with the choice fed on stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import stdlib_documents, write_byte_shards
from training.cli import app
from training.config import load_config
from training.presets import list_presets

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

SEED000_PRESET = {  # seed 000's exact shape, small numbers
    "name": "tiny_mix",
    "description": "Seed 000 shape on byte tokens",
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "seq_length": 64},
    "train": {"train_tokens": 3000, "eval_tokens": 1024, "per_gpu_batch_size": 4, "accumulation_steps": 1,
              "lr": 0.003, "weight_decay": 0.01, "fused_adamw": False, "grad_checkpointing": False,
              "num_workers": 1, "prefetch_factor": 2},
    "data": {"sources": ["wikipedia", "openwebtext"], "min_text_length": 50},
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's folder: configs/tiny_mix.json, and the token shards `orchestrate --experiment tiny_mix` leaves."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_mix.json").write_text(json.dumps(SEED000_PRESET, indent=2))
    docs = stdlib_documents(300_000)
    tokens = tmp_path / "workspace" / "cache" / "tiny_mix" / "tokens"
    write_byte_shards(tokens / "train", docs[4:], 2)
    write_byte_shards(tokens / "val", docs[:4], 1)
    return tmp_path


def test_json_presets_are_listed_beside_yaml(project, monkeypatch) -> None:
    monkeypatch.chdir(project)
    (project / "configs" / "notes.json").write_text("[1, 2]")  # JSON that is not a config: not listed
    listed = {path.name: desc for path, desc in list_presets()}
    assert listed["tiny_mix.json"] == "Seed 000 shape on byte tokens"
    assert "m3_medium.yaml" in listed and "notes.json" not in listed


def test_seed000_budgets_become_steps_for_the_world_size(project, monkeypatch) -> None:
    monkeypatch.chdir(project)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    notes: list[str] = []
    cfg = load_config("configs/tiny_mix.json", [], notes)
    assert cfg.num_steps == 6 and cfg.eval_steps == 2  # ceil(3000 / (4*1*64*2)), ceil(1024 / (4*64*2))
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.attention.n_heads, cfg.seq_len) == (64, 2, 4, 64)
    assert cfg.model.vocab_size == 257  # from the shards' headers: the seed's shape has no vocabulary
    assert cfg.num_workers == 2 and cfg.optimizer.weight_decay == 0.01
    assert cfg.train_data == "workspace/cache/tiny_mix/tokens/train" and cfg.checkpoint_dir == "workspace/runs/tiny_mix/checkpoints"
    assert notes[0] == ("configs/tiny_mix.json: seed 000 preset 'tiny_mix': train.train_tokens 3,000 / (4 per GPU x 1 "
                        "accumulation x 64 tokens x 2 ranks = 512 tokens/step) = 6 steps")


def test_seed000_unknown_key_names_the_path(project, monkeypatch) -> None:
    monkeypatch.chdir(project)
    bad = {**SEED000_PRESET, "train": {**SEED000_PRESET["train"], "epochs": 3}}
    (project / "configs" / "bad.json").write_text(json.dumps(bad))
    result = CliRunner().invoke(app, ["configs/bad.json", "--dry-run"])
    assert result.exit_code == 2
    assert result.stderr.startswith("train: error: configs/bad.json: train.epochs: unknown key in a seed 000 preset")


def test_menu_reads_one_piped_line(project) -> None:
    proc = subprocess.run([sys.executable, "-m", "training", "--dry-run"], cwd=project, input="tiny_mix\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1. tiny_mix       json  Seed 000 shape on byte tokens" in proc.stdout
    assert "config " + str(project / "configs" / "tiny_mix.json") in proc.stdout


@pytest.mark.slow
def test_torchrun_two_ranks_menu_on_rank_0_choice_broadcast(project) -> None:
    proc = subprocess.run([*TORCHRUN, "-m", "training"], cwd=project, input="1\n", capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("Choose a training preset:") == 1  # rank 0 only; rank 1 got the answer through the store
    assert out.count("= 6 steps") == 1 and "device cpu x2 (ddp)" in out
    rows = [json.loads(line) for line in (project / "workspace/runs/tiny_mix/checkpoints/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and "val_loss" in rows[-1]
    saved = yaml.safe_load(json.dumps(json.loads((project / "workspace/runs/tiny_mix/checkpoints/final.config.json").read_text())))
    assert saved["num_steps"] == 6 and saved["model"]["d_model"] == 64
