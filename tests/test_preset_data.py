"""Seed 000 in one command: `train PRESET.json` with a data: section prepares the data through the
orchestrator's pipeline (shard, tokenizer, encode; each skipped when done), then trains; under
torchrun rank 0 prepares while the other rank waits (orchestrator/preset_data.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import stdlib_documents

ROOT = Path(__file__).resolve().parents[1]
PRESET = {  # seed 000's shape; the corpus is a local folder so the test needs no network
    "name": "local_mix",
    "description": "seed 000 preset over local files",
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "seq_length": 32, "vocab_size": 320},
    "train": {"train_tokens": 512, "eval_tokens": 128, "per_gpu_batch_size": 4, "accumulation_steps": 1, "lr": 0.003,
              "weight_decay": 0.01, "fused_adamw": False, "grad_checkpointing": False, "num_workers": 1, "prefetch_factor": 1},
    "data": {"sources": [], "custom_sources": [{"type": "files", "path": "../corpus"}], "min_text_length": 50},
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "local_mix.json").write_text(json.dumps(PRESET, indent=2))
    (tmp_path / "corpus").mkdir()
    docs = [p for d in stdlib_documents(200_000) for p in d.split("\n\n") if len(p) > 50]  # ~2k: some go to val (1%)
    (tmp_path / "corpus" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return tmp_path


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def test_train_preset_prepares_its_data_then_trains_and_skips_it_next_time(project) -> None:
    first = _run([sys.executable, "-m", "training", "configs/local_mix.json"], project)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[data] configs/local_mix.json: preparing data.sources for experiment 'local_mix'" in first.stdout
    for stage in ("shard", "tokenizer"):
        assert f"[stage] {stage}: start (first run)" in first.stdout
    tokens = project / "workspace" / "cache" / "local_mix" / "tokens"
    assert list((tokens / "train").glob("*.tok")) and list((tokens / "val").glob("*.tok"))
    ckpt = project / "workspace" / "runs" / "local_mix" / "checkpoints"
    final = json.loads((ckpt / "final.config.json").read_text())
    assert final["num_steps"] == 4 and final["val_data"].endswith("tokens/val")  # 512 / (4 x 32); val shards found
    assert final["model"]["vocab_size"] <= 320  # from the shards the pipeline wrote
    again = _run([sys.executable, "-m", "training", "configs/local_mix.json"], project)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("shard", "tokenizer"):
        assert f"[stage] {stage}: done earlier with the same inputs, skipped" in again.stdout


def test_a_data_error_is_one_line(project) -> None:
    bad = {**PRESET, "data": {"sources": ["no_such_source"]}}
    (project / "configs" / "bad.json").write_text(json.dumps(bad))
    proc = _run([sys.executable, "-m", "training", "configs/bad.json"], project)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("train: error: configs/bad.json: data: ")
    assert "unknown source 'no_such_source'" in proc.stderr


@pytest.mark.slow
def test_torchrun_rank0_prepares_the_other_waits(project) -> None:
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training",
                 "configs/local_mix.json"], project)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("preparing data.sources") == 1 and proc.stdout.count("[stage] tokenizer: start") == 1
    assert "device cpu x2 (ddp)" in proc.stdout
