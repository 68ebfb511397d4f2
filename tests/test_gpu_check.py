"""bench/gpu_check.py on the CPU with a tiny model: the same trainer calls, save and resume as on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

from training.presets import PROJECT_ROOT


def test_gpu_check_runs_both_configs_saves_resumes_and_writes_its_json(tmp_path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--steps", "4", "--log-every", "2", "--out", str(out), "--workdir", str(tmp_path), "--quiet"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["gpu_tests"] == {"skipped": "no CUDA device"} and report["peak_flops"] is None
    assert [r["config"] for r in report["runs"]] == ["runpod_1b", "runpod_2b"]
    for run in report["runs"]:
        assert run["steps"] == 4 and run["accum"] == 2 and run["micro_batch"] == 4 and run["compile"] is False
        assert run["tokens_per_s"] > 0 and run["mfu"] is None  # no published peak for a CPU
        assert run["planned_gb"] > 0 and run["peak_mem_gb"] > 0 and run["save_s"] >= 0
    ck = report["checkpoint"]
    assert ck["config"] == "runpod_1b" and ck["resumed_step"] == 4 and 0 < ck["resume_s"] < ck["seconds"]
    assert "GPU check on" in proc.stdout and "resume to step 4" in proc.stdout
    assert not list(tmp_path.glob("tmp*"))  # shards and checkpoints removed with the work directory
