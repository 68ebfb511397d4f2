"""``--input PATH...``: several paths after one flag, or the flag repeated, alike in `orchestrate`
and `fineweb-sharder` (README: `--input PATH...`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cli as orchestrate_cli
from sharder.argv import spread_multi_value_flags


def test_values_spread_up_to_the_next_flag_or_override() -> None:
    args = ["--input", "a.txt", "b.txt", "--experiment", "e", "--validation", "v1", "v2", "optimizer.lr=1e-3"]
    assert spread_multi_value_flags(args, ("--input", "--validation"), lambda t: "=" in t) == [
        "--input", "a.txt", "--input", "b.txt", "--experiment", "e",
        "--validation", "v1", "--validation", "v2", "optimizer.lr=1e-3"]
    assert spread_multi_value_flags(["--input", "-odd-name", "x", "--", "--input"], ("--input",)) == [
        "--input", "-odd-name", "--input", "x", "--", "--input"]


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        path = tmp_path / f"part{i}.txt"
        path.write_text(f"document {i} of the corpus\n" * 5)
        paths.append(path)
    return paths


def test_orchestrate_takes_several_inputs_after_one_flag(inputs, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["orchestrate", "--input", *map(str, inputs), "--experiment", "e", "--val-ratio", "0.2",
                                      "--workspace", str(tmp_path / "ws"), "--stop-after", "shard", "optimizer.lr=1e-3"])
    with pytest.raises(SystemExit) as exit_:
        orchestrate_cli.main()
    assert exit_.value.code == 0
    counts = [json.loads((tmp_path / "ws" / "datasets" / split / "e" / "manifest.json").read_text())["totals"]["lines"]
              for split in ("train", "val")]
    assert sum(counts) == 15  # all three files, not the first one with the others taken for overrides


def test_sharder_takes_several_inputs_after_one_flag_like_the_repeated_flag(inputs, tmp_path) -> None:
    def shard(out: Path, *input_args: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "sharder", "--mode", "prod", *input_args, "--output-dir", str(out)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads((out / "manifest.json").read_text())

    spread = shard(tmp_path / "a", "--input", *map(str, inputs))
    repeated = shard(tmp_path / "b", *[arg for p in inputs for arg in ("-i", str(p))])
    assert spread["totals"] == repeated["totals"] and spread["totals"]["lines"] == 15
    assert spread["source"] == repeated["source"]
