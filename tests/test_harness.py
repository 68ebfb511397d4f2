"""``evaluate --harness``: lm-evaluation-harness on the export, offline, with a local task over a local jsonl."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config, write_byte_tokenizer
from orchestrator.use_cli import app
from training.config import validate_config
from training.trainer import train

pytest.importorskip("lm_eval")

TASK = """task: podtrain_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
ROWS = [("import ", ["os\n", "#q}"]), ("def ", ["main(", "}~`~^"]), ("return ", ["self", "@~#~"]),
        ("class ", ["Foo:", "~^`|"]), ("for i in ", ["range(", "$`$~$^"]), ("if x is ", ["None:", "`~^|~"])]  # same lengths


@pytest.mark.slow  # ~30 s: 60 training steps, an export and the harness's own model loading
def test_harness_runs_a_local_task_on_the_export(byte_corpus, tmp_path) -> None:
    from typer.testing import CliRunner

    cfg = tiny_config(byte_corpus, tmp_path, num_steps=60, eval_every=60, save_every=60,
                      tokenizer_path=str(write_byte_tokenizer(tmp_path / "tok")))
    train(validate_config(cfg))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rows.jsonl").write_text("".join(json.dumps({"prompt": p, "choices": c, "answer": 0}) + "\n" for p, c in ROWS))
    (tasks / "podtrain_tiny.yaml").write_text(TASK.format(data=tasks / "rows.jsonl"))
    out = CliRunner().invoke(app, ["evaluate", str(tmp_path / "ckpt" / "final"), "--harness", "podtrain_tiny",
                                   "--harness-include", str(tasks), "--device", "cpu", "--json", str(tmp_path / "e.json")])
    assert out.exit_code == 0, out.output
    acc = json.loads((tmp_path / "e.json").read_text())["harness"]["podtrain_tiny"]["acc,none"]
    assert acc >= 4 / 6  # 60 steps on Python source already prefer Python over line noise
    assert not list((tmp_path / "ckpt").glob(".harness_*"))  # the temporary export is gone
