"""The GPU check's CPU rehearsal: ``bash bench/gpu_check.sh --tiny --device cpu`` with every import
outside the offline CUDA image refused (tests/offline_image/sitecustomize.py), so a package the
image lacks and bench/gpu_wheels.txt does not bring fails here, before a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.presets import PROJECT_ROOT

GUARD = PROJECT_ROOT / "tests" / "offline_image"
NEVER_ON_THE_TRAINING_PATH = {"datasets", "runpod", "datatrove", "spacy", "pypdf"}


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "no-wheels").mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(GUARD), "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
            "GPU_WHEELS": str(tmp_path / "no-wheels"), "PODTRAIN_BLOCKED_LOG": str(tmp_path / "blocked.txt"),
            "OMP_NUM_THREADS": "1", **extra}


def test_the_guard_refuses_what_the_image_lacks(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import yaml, torch, pydantic\nimport datasets"], env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "No module named 'datasets' (not in the offline CUDA image" in proc.stderr
    assert "datasets" in (tmp_path / "blocked.txt").read_text().split()  # with what torch tried optionally (dill)


def test_the_training_path_imports_offline_without_the_pipelines_packages(tmp_path) -> None:
    code = "import training.trainer, training.cli, training.memory_plan, training.sft.loader, training.parallelize"
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path), capture_output=True, text=True, timeout=120,
                          cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    blocked = set((tmp_path / "blocked.txt").read_text().split()) if (tmp_path / "blocked.txt").exists() else set()
    assert not blocked & NEVER_ON_THE_TRAINING_PATH, blocked


def test_a_missing_wheel_stops_the_check_with_one_line_naming_it(tmp_path) -> None:
    env = offline_env(tmp_path, PODTRAIN_OFFLINE_DROP="pydantic")
    proc = subprocess.run(["bash", str(PROJECT_ROOT / "bench" / "gpu_check.sh"), "--tiny", "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "the training path does not import here (ModuleNotFoundError: No module named 'pydantic'" in proc.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()


@pytest.mark.slow  # a minute or two: 6 trainer runs, a resume, packed attention, pytest of tests/gpu
def test_cpu_rehearsal_runs_every_part_offline_and_writes_one_json(tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(["bash", str(PROJECT_ROOT / "bench" / "gpu_check.sh"), "--tiny", "--device", "cpu", "--steps", "4",
                           "--log-every", "2", "--workdir", str(work), "--quiet"],
                          env=offline_env(tmp_path), capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["failures"] == [] and report["peak_flops"] is None and report["tiny"]
    assert [e["config"] for e in report["configs"]] == ["runpod_1b", "runpod_2b"]
    for entry in report["configs"]:
        assert [r["strategy"] for r in entry["runs"]] == ["none", "ddp", "fsdp"]
        for run in entry["runs"]:
            assert run["returncode"] == 0 and run["steps"] == 4 and run["tokens_per_s"] > 0 and run["mfu"] is None
            assert run["planned_gb"] > 0 and set(run["plan_terms_gb"]) >= {"parameters", "activations"}
        assert entry["accum"] == 2 and entry["sdpa_causal_block"]["backends"]  # which SDPA kernel ran
        assert entry["loss_kernels"]["chunked_ms"] > 0 and entry["loss_kernels"]["liger"] in ("CUDA only", "not installed")
    ck = report["checkpoint"]
    assert ck["strategy"] == "fsdp" and ck["step_tag"] == "step0000002.dcp" and ck["step_tag_gb"] > 0 and ck["final_gb"] > 0
    assert ck["resumed_step"] == 2 and ck["trained_to"] == 5 and ck["resume_returncode"] == 0
    assert ck["loss_diff"] <= 1e-5  # the resumed run logs step 4's loss again
    packed = report["packed_attention"]
    assert {"dense", "causal"} <= set(packed["variants"]) and 0 < packed["in_document_share_of_causal_pairs"] <= 1
    assert all(v["tokens_per_s"] > 0 for v in packed["variants"].values())
    assert packed["flex_option"] == "attention.impl" and "flex: CUDA only" in packed["note"]
    pytest_log = (out / "pytest_gpu.txt").read_text()  # the whole output, not its last line
    assert "tests/gpu/test_cuda.py::test_fsdp_on_one_gpu SKIPPED" in pytest_log and "skipped" in pytest_log.splitlines()[-1]
    assert "GPU check on" in (out / "gpu_check.log").read_text()
    blocked = set((tmp_path / "blocked.txt").read_text().split()) if (tmp_path / "blocked.txt").exists() else set()
    assert not blocked & NEVER_ON_THE_TRAINING_PATH, blocked
    assert not any(work.iterdir())  # every config's shards and checkpoints deleted
