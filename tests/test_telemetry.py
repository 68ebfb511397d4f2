"""Seed 004's telemetry: every log_every, CPU %, process RSS and system RAM (plus GPU memory on
CUDA, see tests/gpu) in metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json

import psutil
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from conftest import tiny_config
from training.cli import app
from training.metrics import system_telemetry

SYSTEM_KEYS = {"cpu_percent", "rss_gb", "ram_used_gb"}


def test_telemetry_every_log_step_in_metrics_and_tensorboard(byte_corpus, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(byte_corpus, tmp_path, num_steps=6, log_every=2, eval_every=100)))
    result = CliRunner().invoke(app, [str(path)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "loss" in row]
    assert [row["step"] for row in logged] == [2, 4, 6]
    for row in logged:
        assert SYSTEM_KEYS <= row.keys()
        assert 0.05 < row["rss_gb"] < row["ram_used_gb"] <= psutil.virtual_memory().total / 1e9
        assert row["cpu_percent"] >= 0
        assert "gpu_mem_allocated_gb" not in row  # a CPU run has no GPU figures rather than zeros
    events = EventAccumulator(str(tmp_path / "ckpt" / "tensorboard"))
    events.Reload()
    for key in SYSTEM_KEYS:
        assert [e.step for e in events.Scalars(key)] == [2, 4, 6]


def test_cpu_percent_measures_the_time_since_the_previous_sample() -> None:
    system_telemetry(torch.device("cpu"))
    x = torch.randn(300, 300)
    for _ in range(200):  # keep one core busy for a moment
        x = torch.tanh(x @ x)
    assert system_telemetry(torch.device("cpu"))["cpu_percent"] > 5
