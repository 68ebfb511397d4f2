"""CUDA-only checks (marker ``gpu``): run on a GPU machine with ``pytest -m gpu tests/gpu``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from training.config import validate_config
from training.trainer import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def gpu_config(corpus, out: Path, **extra):
    cfg = tiny_config(corpus, out, **{"num_steps": 40, "eval_every": 20, "device": "cuda", "dtype": "bfloat16", **extra})
    return validate_config(cfg)


def test_bf16_autocast_learns(byte_corpus, tmp_path) -> None:
    result = train(gpu_config(byte_corpus, tmp_path))
    assert result.exit_code == 0 and result.val_losses[40] < result.val_losses[20] < 5.5


def test_compile_matches_eager_closely(byte_corpus, tmp_path) -> None:
    eager = train(gpu_config(byte_corpus, tmp_path / "eager", num_steps=10))
    compiled = train(gpu_config(byte_corpus, tmp_path / "compiled", num_steps=10, compile_model=True))
    for step in range(1, 11):
        assert abs(eager.losses[step] - compiled.losses[step]) < 0.05


def test_activation_checkpointing_cuts_peak_memory(byte_corpus, tmp_path) -> None:
    peaks = {}
    for ac in (False, True):
        torch.cuda.reset_peak_memory_stats()
        cfg = gpu_config(byte_corpus, tmp_path / str(ac), num_steps=3, activation_checkpointing=ac, batch_size=32,
                         model__num_layers=8, model__d_model=256)
        train(cfg)
        peaks[ac] = torch.cuda.max_memory_allocated()
    assert peaks[True] < peaks[False]


def test_fsdp_on_one_gpu(byte_corpus, tmp_path) -> None:
    cfg = tiny_config(byte_corpus, tmp_path, num_steps=10, device="cuda", dtype="bfloat16")
    cfg["distributed"] = {"strategy": "fsdp"}
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "-m", "training", str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(fsdp)" in proc.stdout and "FSDP mixed precision" in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 10 and lines[-1].get("loss", 0) < 5.6
