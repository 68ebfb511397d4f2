"""`orchestrate --mode local` end to end through its real CLI: the five stages on a small real-text
corpus, markers that make a re-run a no-op, a changed setting that redoes only what follows it,
--dry-run, the environment knobs, and the missing-shard abort."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import stdlib_documents
from training.checkpoint_tags import list_tags
from training.config import load_config

STAGES = ["layout", "shard", "tokenizer", "emit", "train"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """~400 KB of standard-library sources as JSON lines, and a tiny training config."""
    root = tmp_path_factory.mktemp("orchestrate_inputs")
    corpus = root / "corpus.jsonl"
    docs = stdlib_documents(400_000)
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": d}) + "\n" for i, d in enumerate(docs)))
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "description": "orchestrator test", "train_data": "unset", "seq_len": 32, "batch_size": 4, "num_steps": 4,
        "checkpoint_dir": "unset", "save_every": 2, "log_every": 1, "eval_every": 2, "eval_steps": 1, "num_workers": 0,
        "device": "cpu", "model": {"vocab_size": 512, "d_model": 32, "num_layers": 1, "max_seq_len": 64,
                                   "attention": {"n_heads": 2}, "ffn": {"hidden_size": 64}},
    }))
    return {"corpus": corpus, "config": config}


def orchestrate(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("RUN_SHARD", "RUN_EXPERIMENT", "RUN_CONFIG", "SHARD_LINES")}
    full_env.update({"COLUMNS": "200", **(env or {})})
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=240)


def base_args(inputs: dict[str, Path], workspace: Path) -> list[str]:
    return ["--mode", "local", "--workspace", str(workspace), "--input", str(inputs["corpus"]), "--experiment", "e2e",
            "--config", str(inputs["config"]), "--train-shard-lines", "8", "--val-ratio", "0.1"]


def stage_lines(output: str) -> dict[str, str]:
    """stage name -> the status the runner printed for it (start/skipped)."""
    found = {}
    for line in output.splitlines():
        if line.startswith("[stage] ") and ": " in line:
            name, rest = line[len("[stage] "):].split(": ", 1)
            if name in STAGES and (rest.startswith("start") or rest.startswith("done earlier")):
                found[name] = "ran" if rest.startswith("start") else "skipped"
    return found


@pytest.fixture(scope="module")
def first_run(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    workspace = tmp_path_factory.mktemp("orchestrate") / "ws"
    proc = orchestrate(*base_args(inputs, workspace), "optimizer.lr=2e-3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workspace, proc


def test_local_mode_runs_every_stage_and_trains(first_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    workspace, proc = first_run
    assert stage_lines(proc.stdout) == dict.fromkeys(STAGES, "ran")
    for folder in ("datasets/train/e2e", "datasets/val/e2e", "artifacts/tokenizer/e2e", "runs/e2e", "cache/e2e", "hf_cache"):
        assert (workspace / folder).is_dir(), folder
    assert json.loads((workspace / "datasets/train/e2e/manifest.json").read_text())["totals"]["shards"] >= 2
    run = workspace / "runs" / "e2e"
    yaml_cfg, toml_cfg = load_config(run / "training.yaml"), load_config(run / "training.toml")
    assert yaml_cfg == toml_cfg
    assert yaml_cfg.optimizer.lr == 2e-3  # the trailing key=value went into the emitted config
    assert Path(yaml_cfg.train_data) == workspace / "cache/e2e/tokens/train" and yaml_cfg.val_data
    assert Path(yaml_cfg.checkpoint_dir) == run / "checkpoints"
    assert (4, "final") in list_tags(run / "checkpoints")
    for name in STAGES:
        marker = json.loads((run / "stages" / f"{name}.json").read_text())
        assert marker["stage"] == name and len(marker["fingerprint"]) == 64
    assert "pipeline summary" in proc.stdout and "tokens/s" in proc.stdout


def test_rerun_skips_every_stage_and_changes_nothing(inputs, first_run) -> None:
    workspace, _ = first_run
    run = workspace / "runs" / "e2e"
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    proc = orchestrate(*base_args(inputs, workspace), "optimizer.lr=2e-3")
    assert proc.returncode == 0, proc.stderr
    assert stage_lines(proc.stdout) == dict.fromkeys(STAGES, "skipped")
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before


def test_changed_setting_redoes_only_the_stages_after_it(inputs, first_run) -> None:
    """Asking for more steps changes the emitted config: emit and train run again (training resumes
    from step 4 and continues to 6); the shards and the tokenizer are reused."""
    workspace, _ = first_run
    run = workspace / "runs" / "e2e"
    tokens_before = {p: p.stat().st_mtime_ns for p in (workspace / "cache/e2e/tokens/train").iterdir()}
    proc = orchestrate(*base_args(inputs, workspace), "optimizer.lr=2e-3", "num_steps=6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stage_lines(proc.stdout) == {"layout": "skipped", "shard": "skipped", "tokenizer": "skipped", "emit": "ran", "train": "ran"}
    assert {p: p.stat().st_mtime_ns for p in (workspace / "cache/e2e/tokens/train").iterdir()} == tokens_before
    steps = [json.loads(line)["step"] for line in (run / "checkpoints" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line) and "step" in json.loads(line)]
    assert steps[-2:] == [5, 6] and steps.count(5) == 1  # resumed, not restarted
    assert (6, "final") in list_tags(run / "checkpoints")


def test_orchestrate_starts_without_torch_or_datasets() -> None:
    """Every `orchestrate` command (help, pod, the pipeline's planning) loads without torch and
    datasets, about a second each, which only the stages that need them import."""
    code = "import sys, orchestrator.cli, orchestrator.pipeline; print(sorted({'torch', 'datasets'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_dry_run_prints_the_plan_and_touches_nothing(inputs, first_run, tmp_path) -> None:
    fresh = tmp_path / "ws"
    proc = orchestrate(*base_args(inputs, fresh), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert not fresh.exists()
    assert proc.stdout.count("would run") == 5 and "dry run" in proc.stdout
    assert str(fresh / "datasets" / "train" / "e2e") in proc.stdout
    workspace, _ = first_run
    snapshot = sorted((str(p), p.stat().st_mtime_ns) for p in workspace.rglob("*"))
    done = orchestrate(*base_args(inputs, workspace), "optimizer.lr=2e-3", "num_steps=6", "--dry-run")
    assert done.returncode == 0 and done.stdout.count("would skip") == 5, done.stdout
    assert sorted((str(p), p.stat().st_mtime_ns) for p in workspace.rglob("*")) == snapshot


def test_environment_knobs_are_the_defaults(inputs, tmp_path) -> None:
    workspace = tmp_path / "ws"
    env = {"RUN_EXPERIMENT": "knobbed", "RUN_CONFIG": str(inputs["config"]), "SHARD_LINES": "77", "RUN_SHARD": "1"}
    proc = orchestrate("--mode", "local", "--workspace", str(workspace), "--input", str(inputs["corpus"]),
                       "--stop-after", "shard", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"config {inputs['config']}" in proc.stdout
    manifest = json.loads((workspace / "datasets/train/knobbed/manifest.json").read_text())
    assert manifest["settings"]["lines_per_shard"] == 77
    # RUN_SHARD=0: reuse the shards just made, no --input needed; on an experiment without shards it is refused
    reuse = orchestrate("--mode", "local", "--workspace", str(workspace), "--stop-after", "shard", env={**env, "RUN_SHARD": "0"})
    assert reuse.returncode == 0 and "reused" in reuse.stdout, reuse.stderr
    empty = orchestrate("--mode", "local", "--workspace", str(workspace), "--stop-after", "shard",
                        env={**env, "RUN_SHARD": "0", "RUN_EXPERIMENT": "nothing-here"})
    assert empty.returncode == 2 and "no shards in" in empty.stderr and str(workspace / "datasets/train/nothing-here") in empty.stderr
    # RUN_SHARD=auto (and unset, its default): without --input, the experiment's shards are reused;
    # where there are none, --input is asked for
    for auto in ({"RUN_SHARD": "auto"}, {}):
        knobs = {k: v for k, v in {**env, **auto}.items() if auto or k != "RUN_SHARD"}
        reused = orchestrate("--mode", "local", "--workspace", str(workspace), "--stop-after", "shard", env=knobs)
        assert reused.returncode == 0 and "reused" in reused.stdout, reused.stderr
        none = orchestrate("--mode", "local", "--workspace", str(workspace), "--stop-after", "shard",
                           env={**knobs, "RUN_EXPERIMENT": "nothing-here"})
        assert none.returncode == 2 and "--input: required to shard" in none.stderr
    bad = orchestrate("--mode", "local", "--workspace", str(workspace), env={**env, "RUN_SHARD": "yes"})
    assert bad.returncode == 2 and bad.stderr.strip() == "orchestrate: error: RUN_SHARD='yes': expected auto, 0 or 1"


def test_missing_shards_abort_before_launch_with_a_listing(inputs, first_run, tmp_path) -> None:
    workspace, _ = first_run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not tokens")
    proc = orchestrate(*base_args(inputs, workspace), "optimizer.lr=2e-3", f"train_data={empty}", f"val_data={tmp_path / 'gone'}")
    assert proc.returncode == 2, proc.stdout[-2000:]
    err = proc.stderr
    assert "stage emit failed: missing or empty shards, not launching" in err
    assert f"train_data: expected token shards (*.tok) with tokens in {empty}" in err and "notes.txt" in err
    assert f"val_data: expected token shards (*.tok) with tokens in {tmp_path / 'gone'}" in err and "(does not exist)" in err
    assert "[stage] train" not in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--mode", "space"], "orchestrate: error: --mode 'space': expected cloud or local"),
    (["--stop-after", "bake"], "--stop-after 'bake': expected one of layout, shard, curate, tokenizer, emit, train"),
    (["model.num_layerz=2"], "model.num_layerz"),
    (["--input", "/no/such/corpus.jsonl"], "--input /no/such/corpus.jsonl: no such file"),
])
def test_bad_arguments_are_one_line_and_touch_nothing(inputs, tmp_path, args: list[str], message: str) -> None:
    workspace = tmp_path / "ws"
    base = ["--mode", "local", "--workspace", str(workspace), "--input", str(inputs["corpus"]), "--config", str(inputs["config"])]
    proc = orchestrate(*base, *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not workspace.exists()


@pytest.mark.slow  # a 2-rank launch through the whole pipeline; make test launches 2 ranks in tests/test_distributed.py
def test_more_than_one_process_trains_through_torchrun(inputs, tmp_path) -> None:
    """The multi-GPU launch path, on two CPU processes (gloo): torchrun, DDP, one checkpoint set."""
    workspace = tmp_path / "ws"
    proc = orchestrate(*base_args(inputs, workspace), "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 -m training" in proc.stdout
    assert "global batch: 4 x 1 accumulation x 2 ranks = 8 sequences" in proc.stdout
    assert "device cpu x2 (ddp)" in proc.stdout
    assert (4, "final") in list_tags(workspace / "runs/e2e/checkpoints")


def test_cloud_mode_forces_the_hf_caches_onto_the_workspace_and_local_mode_keeps_yours(inputs, tmp_path) -> None:
    elsewhere = {"HF_HOME": str(tmp_path / "container-disk"), "HF_DATASETS_CACHE": str(tmp_path / "container-disk/ds")}
    for mode, expected in (("cloud", {"HF_HOME": "ws/hf_cache", "HF_DATASETS_CACHE": "ws/hf_cache/datasets"}),
                           ("local", {"HF_HOME": "container-disk", "HF_DATASETS_CACHE": "container-disk/ds"})):
        workspace = tmp_path / "ws"
        proc = orchestrate("--mode", mode, "--workspace", str(workspace), "--input", str(inputs["corpus"]),
                           "--experiment", mode, "--config", str(inputs["config"]), "--stop-after", "layout", env=elsewhere)
        assert proc.returncode == 0, proc.stderr
        marker = json.loads((workspace / "runs" / mode / "stages" / "layout.json").read_text())
        assert marker["summary"]["hf"] == {k: str(tmp_path / v) for k, v in expected.items()}
        assert ("replaced by" in proc.stdout) == (mode == "cloud")
