"""infra/boot.sh for real: the installed `fineweb-sharder` and `orchestrate`, a local corpus, a tiny
config, the workspace root in a temporary folder. The pod is stopped (SIGTERM) in the middle of
training, and the next boot resumes the run instead of starting over."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import stdlib_documents

BOOT = Path(__file__).resolve().parents[1] / "infra" / "boot.sh"
PROJECT = BOOT.parents[1]
STAGE_ORDER = ["install", "prep", "shard", "tokenizer", "train"]


def _metrics_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [row["step"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]


def _stages_started(log: str) -> list[str]:
    """Stage names from the boot's "<time> boot: stage NAME: start: ..." lines, in order."""
    return [line.split(" boot: stage ", 1)[1].split(":", 1)[0] for line in log.splitlines()
            if " boot: stage " in line and ": start: " in line]


def test_boot_runs_four_stages_in_order_and_a_second_boot_resumes(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_documents(300_000)))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "train_data": "unset", "checkpoint_dir": "unset", "seq_len": 32, "batch_size": 4, "num_steps": 600,
        "save_every": 10_000, "log_every": 1, "eval_every": 10_000, "num_workers": 0, "device": "cpu",
        "model": {"vocab_size": 512, "d_model": 32, "num_layers": 1, "max_seq_len": 64, "attention": {"n_heads": 2},
                  "ffn": {"hidden_size": 64}},
    }))
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    (stand_ins / "tensorboard").write_text("#!/bin/sh\nexec sleep 60\n")  # no real server on :6006 in a test
    (stand_ins / "tensorboard").chmod(0o755)
    root = tmp_path / "workspace"
    env = {
        "PATH": f"{stand_ins}:{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
        "PODTRAIN_WORKSPACE": str(root), "PODTRAIN_PROJECT": str(PROJECT), "BOOT_HALT": "exit",
        "BOOT_START_SCRIPT": str(tmp_path / "no-start.sh"), "RUN_SHARD": "1", "RUN_INPUT": str(corpus),
        "RUN_EXPERIMENT": "boot-e2e", "RUN_CONFIG": str(config), "SHARD_LINES": "10",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }
    run_dir = root / "runs" / "boot-e2e"
    metrics = run_dir / "checkpoints" / "metrics.jsonl"

    first = subprocess.Popen(["bash", str(BOOT)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len(_metrics_steps(metrics)) < 20:
            assert first.poll() is None, f"boot ended before training was under way:\n{first.stdout.read()}"
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)  # `pod stop` / a spot preemption
        out, _ = first.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 143, out
    assert _stages_started(out) == STAGE_ORDER, out
    assert (root / "datasets/train/boot-e2e/manifest.json").exists() and (root / "datasets/val/boot-e2e").is_dir()
    assert (root / "artifacts/tokenizer/boot-e2e/tokenizer.json").exists()
    assert (run_dir / "training.yaml").exists() and (run_dir / "training.toml").exists()
    assert not (run_dir / "BOOT_FAILED").exists()  # a stop is not a failure
    stopped_at = _metrics_steps(metrics)[-1]
    assert stopped_at < 600

    second = subprocess.run(["bash", str(BOOT)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-4000:]
    assert _stages_started(second.stdout) == STAGE_ORDER
    assert f"resumed from {run_dir / 'checkpoints'}" in second.stdout and f"at step {stopped_at}" in second.stdout
    assert "[stage] tokenizer: done earlier with the same inputs, skipped" in second.stdout
    assert _metrics_steps(metrics) == list(range(1, 601))  # nothing lost, nothing done twice
    log = (run_dir / "boot.log").read_text()
    assert log.count("---- boot of experiment boot-e2e") == 2 and "boot finished: training is complete" in log
