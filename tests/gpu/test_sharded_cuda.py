"""Sharded async checkpoints of an FSDP run on CUDA: shards staged from the GPU, resumed on the same curve (marker ``gpu``)."""

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

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(cfg: dict, out: Path, *args: str) -> dict[int, float]:
    path = out / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "-m", "training", str(path), *args], cwd=out, capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    found: dict[int, float] = {}
    for line in (out / "ckpt" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            found[row["step"]] = row["loss"]
    return found


def test_fsdp_step_tags_are_sharded_and_resume_on_the_same_curve(byte_corpus, tmp_path) -> None:
    cfg = tiny_config(byte_corpus, tmp_path, num_steps=6, save_every=3, eval_every=100, device="cuda", dtype="bfloat16")
    cfg["distributed"] = {"strategy": "fsdp"}
    first = _run(cfg, tmp_path)
    folder = tmp_path / "ckpt" / "step0000003.dcp"
    assert (folder / ".metadata").is_file() and (folder / "__0_0.distcp").is_file()
    resumed = _run(cfg, tmp_path, "--resume", str(folder))
    for step in range(4, 7):
        assert abs(resumed[step] - first[step]) < 2e-3, (step, resumed[step], first[step])
