"""Issue 24, item 6: what used to be a traceback is one line (or, for W&B, one warning and the run goes on).

Each case runs the real command in a subprocess, as a user would, with the Hugging Face hub offline
and an empty cache (nothing reaches the network)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_cache"),
            "HOME": str(tmp_path / "home"), **extra}


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path, **env), timeout=300)


def _train(byte_corpus, tmp_path: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(byte_corpus, tmp_path, num_steps=2, eval_every=2)))
    return _run(["-m", "training", str(config), *overrides], tmp_path, **env)


def test_sft_prepare_offline_names_the_source_and_the_way_around_it(tmp_path: Path) -> None:
    proc = _run(["-m", "orchestrator", "sft", "prepare", "--stages", "instruct", "--instruct-limit", "5",
                 "--workspace", str(tmp_path / "ws")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "orchestrate sft: error: instruct source yahma/alpaca-cleaned: offline mode is on (HF_HUB_OFFLINE=1) and it is not "
        "in the Hugging Face cache; run once online, or read local copies with --source yahma/alpaca-cleaned=FILE or your "
        "own --file instruct=FILE and --no-hub"]
    assert not list((tmp_path / "ws").rglob("*.jsonl"))  # no half-written file under its real name


def test_init_from_a_hub_id_offline_is_one_line(byte_corpus, tmp_path: Path) -> None:
    proc = _train(byte_corpus, tmp_path, "init_from=gpt2")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: error: init_from gpt2: not a local checkpoint or folder, and not "
                                                   "fetched from the Hugging Face hub (not in the local Hugging Face cache, "
                                                   "and HF_HUB_OFFLINE=1"), proc.stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the wandb extra is not installed")
def test_wandb_without_login_warns_once_and_the_run_trains_on(byte_corpus, tmp_path: Path) -> None:
    proc = _train(byte_corpus, tmp_path, "use_wandb=true", WANDB_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: use_wandb:")]
    assert len(warnings) == 1 and "continuing without it" in warnings[0] and "wandb login" in warnings[0], proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2 and (tmp_path / "ckpt" / "final.safetensors").exists()


@pytest.mark.parametrize("device, absent, message", [
    ("mps", not torch.backends.mps.is_available(), "device: mps requested but MPS (Apple-silicon GPU) is not available on this machine"),
    ("cuda", not torch.cuda.is_available(), "device: cuda:0 requested but CUDA is not available on this machine"),
])
def test_a_device_the_machine_lacks_is_one_line(byte_corpus, tmp_path: Path, device: str, absent: bool, message: str) -> None:
    if not absent:
        pytest.skip(f"this machine has {device}")
    proc = _train(byte_corpus, tmp_path, f"device={device}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"train: error: {message} (use device=auto or cpu)"]
