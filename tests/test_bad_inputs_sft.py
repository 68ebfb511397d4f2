"""Bad fine-tuning input (issue 25): ``orchestrate sft prepare`` and the SFT stages of ``orchestrate``.
Each case is one line naming the file, flag or key, exit 2, refused before any work where it can be.
Helpers: tests/test_bad_inputs.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from conftest import stdlib_documents
from orchestrator.pipeline import Pipeline, PipelineError, PipelineOptions
from orchestrator.sft.cli import app as sft_app
from test_bad_inputs import one_line

ROOT = Path(__file__).resolve().parents[1]
ALPACA = {"instruction": "Say hi", "input": "", "output": "hi"}


def prepare(out: Path, *args: str):
    return CliRunner().invoke(sft_app, ["prepare", "--stages", "instruct", "--no-hub", "--out", str(out), *args])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# 13. zero usable records for a requested stage is an error at prepare time ------------------------------
@pytest.mark.parametrize("content, first", [
    ('{"text": "a web page"}\n{"text": "another"}\n', ":1: no canonical keys (messages, instruction, user_message or question) among ['text']"),
    ("", None),
])
def test_no_usable_record_is_an_error_at_prepare_time(tmp_path, content, first) -> None:
    path = write(tmp_path / "mine.jsonl", content)
    result = prepare(tmp_path / "out", "--file", f"instruct={path}")
    assert result.exit_code == 2
    rows = content.count("\n")
    expected = f"orchestrate sft: error: --stages instruct: no usable record in {rows} rows of file:mine.jsonl"
    expected += f" (first: {path}{first})" if first else ""
    assert one_line(result.stderr) == expected + "; nothing to fine-tune on"
    assert not (tmp_path / "out" / "instruct_data.jsonl").exists()


# 11. a local source file in broken JSON Lines: file:line, not a DatasetGenerationError traceback ---------
def test_broken_jsonl_source_names_file_and_line(tmp_path) -> None:
    rows = [json.dumps({**ALPACA, "instruction": f"task {i}"}) for i in range(3000)]
    rows[2999] = '{"instruction": "broken'
    path = write(tmp_path / "alpaca.jsonl", "\n".join(rows) + "\n")
    result = prepare(tmp_path / "out", "--source", f"alpaca-cleaned={path}")
    assert result.exit_code == 2
    assert one_line(result.stderr) == f"orchestrate sft: error: {path}:3000: not valid JSON (Unterminated string starting at column 17)"


# 15. a killed run's part temporaries are removed by the next run -----------------------------------------
def test_stale_part_temporaries_are_removed_on_the_next_run(tmp_path) -> None:
    path = write(tmp_path / "mine.jsonl", json.dumps(ALPACA) + "\n")
    stale = write(tmp_path / "out" / "parts" / "instruct" / ".tmp-file__mine.jsonl.jsonl.k3j2x9_q", '{"half": ')
    result = prepare(tmp_path / "out", "--file", f"instruct={path}")
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "out" / "parts" / "instruct").iterdir() if p.name.startswith(".tmp-")] == []


# 5 and 12. the SFT stages' inputs and vocabulary, checked when orchestrate plans ----------------------
def plan(tmp_path: Path, stages: list[str], overrides: list[str]) -> Pipeline:
    opts = PipelineOptions(workspace=tmp_path / "ws", experiment="x", config=str(ROOT / "configs" / "demo.yaml"),
                           stages=stages, overrides=overrides, inputs=[str(write(tmp_path / "in.txt", "a document\n"))])
    return Pipeline(opts, Console(file=io.StringIO()))


def prepared(tmp_path: Path, text: str = json.dumps(ALPACA) + "\n") -> Path:
    return write(tmp_path / "ws" / "datasets" / "sft" / "x" / "instruct_data.jsonl", text)


@pytest.mark.parametrize("stages, override", [
    (["pretrain", "instruct"], "instruct.model.vocab_size=600"),
    (["instruct"], "model.vocab_size=512"),
])
def test_an_override_of_the_sft_vocabulary_is_refused_at_the_start(tmp_path, stages, override) -> None:
    prepared(tmp_path)
    with pytest.raises(PipelineError) as err:
        plan(tmp_path, stages, [override])
    assert str(err.value) == (f"{override}: an SFT stage's model.vocab_size is the one its start checkpoint has (the "
                              f"pretrained model's, grown by the chat tokens); drop the override (a plain model.vocab_size=N "
                              f"with --stages pretrain,... sizes the pretraining model)")


def test_pretraining_vocabulary_override_is_accepted_with_sft_stages(tmp_path) -> None:
    prepared(tmp_path)
    pipe = plan(tmp_path, ["pretrain", "instruct"], ["model.vocab_size=512"])
    assert pipe.base_config.model.vocab_size == 512


def test_an_empty_prepared_stage_file_is_refused_at_the_start(tmp_path) -> None:
    data = prepared(tmp_path, "")
    with pytest.raises(PipelineError) as err:
        plan(tmp_path, ["pretrain", "instruct"], [])
    assert str(err.value) == (f"instruct: {data} holds no record; run orchestrate sft prepare --stages instruct "
                              f"--experiment x --workspace {tmp_path / 'ws'} first")
    assert not (tmp_path / "ws" / "datasets" / "train").exists()


@pytest.mark.slow  # pretraining and one SFT stage through the real trainer: about 40 s on a busy machine
@pytest.mark.timeout(600)
def test_pretrain_then_instruct_with_the_files_own_vocab_override(tmp_path) -> None:
    """Seed 004's chain with ``model.vocab_size=512`` (the file's own value) on the command line: the
    pretraining model has 512 ids, the instruct stage the chat bundle's 512 + chat tokens."""
    ws, exp = tmp_path / "ws", "v"
    corpus = write(tmp_path / "corpus.txt", "\n".join(" ".join(d.split()) for d in stdlib_documents(150_000)) + "\n")
    config = write(tmp_path / "tiny.yaml", yaml.safe_dump({
        "seq_len": 64, "batch_size": 4, "num_steps": 2, "save_every": 1000, "log_every": 1, "eval_every": 1000,
        "eval_steps": 1, "num_workers": 0, "device": "cpu", "train_data": "unset",
        "model": {"vocab_size": 512, "d_model": 32, "num_layers": 1, "max_seq_len": 64, "attention": {"n_heads": 2},
                  "ffn": {"hidden_size": 64}}}))
    write(ws / "datasets" / "sft" / exp / "instruct_data.jsonl", "".join(json.dumps({**ALPACA, "instruction": f"say {i}"}) + "\n"
                                                                      for i in range(20)))
    opts = PipelineOptions(inputs=[str(corpus)], experiment=exp, workspace=ws, config=str(config), train_shard_lines=200,
                           stages=["pretrain", "instruct"], nproc=1, overrides=["model.vocab_size=512", "instruct.num_steps=2"])
    out = io.StringIO()
    records = Pipeline(opts, Console(file=out, width=200)).run()
    assert [r.status for r in records][-2:] == ["ran", "ran"], out.getvalue()
    pretrained = yaml.safe_load((ws / "runs" / exp / "training.yaml").read_text())
    instruct = yaml.safe_load((ws / "runs" / exp / "instruct" / "training.yaml").read_text())
    assert pretrained["model"]["vocab_size"] == 512 and instruct["model"]["vocab_size"] > 512
