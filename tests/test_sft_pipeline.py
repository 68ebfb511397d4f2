"""``--stages`` and the SFT stages' bad inputs: one line, exit 2, nothing trained."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.pipeline import Pipeline, PipelineError, PipelineOptions
from orchestrator.sft.stages import parse_stages, split_overrides
from orchestrator.stages import StageFailed

ROOT = Path(__file__).resolve().parents[1]


def test_stages_and_per_stage_overrides_parse() -> None:
    assert parse_stages("pretrain,instruct,tool,reasoning") == ["pretrain", "instruct", "tool", "reasoning"]
    assert parse_stages("instruct") == ["instruct"]
    for bad in ("pretrain,chat", "tool,instruct", "instruct,instruct", ""):
        with pytest.raises(ValueError, match="--stages"):
            parse_stages(bad)
    common, per = split_overrides(["device=cpu", "instruct.num_steps=5", "tool.optimizer.lr=2e-5", "optimizer.lr=1e-3"])
    assert common == ["device=cpu", "optimizer.lr=1e-3"]
    assert per["instruct"] == ["num_steps=5"] and per["tool"] == ["optimizer.lr=2e-5"] and per["reasoning"] == []


def test_bad_stages_flag_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "--workspace", str(tmp_path), "--stages", "pretrain,chat",
                           "--reuse-shards"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["orchestrate: error: --stages 'pretrain,chat': expected a comma-separated "
                                                "subset of pretrain,instruct,tool,reasoning"]


def test_an_sft_stage_without_its_data_names_the_command_that_makes_it(tmp_path: Path) -> None:
    opts = PipelineOptions(workspace=tmp_path, experiment="x", config=str(ROOT / "configs" / "demo.yaml"), stages=["instruct"])
    with pytest.raises(PipelineError, match=r"instruct_data.jsonl missing; run orchestrate sft prepare --stages instruct"):
        Pipeline(opts, Console(file=io.StringIO()))  # when the run is planned, before any stage
    (tmp_path / "datasets" / "sft" / "x").mkdir(parents=True)
    (tmp_path / "datasets" / "sft" / "x" / "instruct_data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    pipe = Pipeline(opts, Console(file=io.StringIO()))
    assert [s.name for s in pipe.stages()] == ["layout", "instruct"]
    with pytest.raises(StageFailed, match="is .* a tokenizer bundle"):
        pipe.run()
