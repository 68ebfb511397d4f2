"""The heartbeat boot.sh's watchdog reads: what one beat writes, that it costs at most one small
write every few seconds, and that every long stage beats with its own progress (the sharder
documents, the tokenizer sample and the encoder bytes, the trainer steps, sft prepare the rows it
reads), run for real on small inputs with `Heartbeat.beat` spied on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import stdlib_documents, tiny_config
from orchestrator.sft.cli import app as sft_app
from orchestrator.tokenizer.bpe import prepare_tokenizer
from orchestrator.tokenizer.encode import encode_shards
from sharder.pipeline import ShardOptions, run_shard
from training.config import validate_config
from training.heartbeat import ENV, Heartbeat
from training.trainer import train


def test_a_beat_writes_one_json_line_and_no_more_than_one_per_interval(tmp_path: Path,
                                                                        monkeypatch) -> None:
    target = tmp_path / "runs" / "heartbeat"
    target.parent.mkdir()
    monkeypatch.setenv(ENV, str(target))
    beat = Heartbeat("shard", "documents")
    beat.beat(5)
    first = json.loads(target.read_text())
    assert (first["stage"], first["unit"], first["progress"]) == ("shard", "documents", 5)
    beat.beat(6)  # within the interval: nothing written
    assert json.loads(target.read_text()) == first
    eager = Heartbeat("shard", "documents", every_s=0)
    eager.beat(7)
    eager.beat(8)
    assert json.loads(target.read_text())["progress"] == 8
    assert sorted(p.name for p in target.parent.iterdir()) == ["heartbeat"]  # no temporaries left


def test_without_the_variable_or_on_another_rank_nothing_is_written(tmp_path: Path,
                                                                     monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    Heartbeat("train", "steps").beat(1)
    monkeypatch.setenv(ENV, str(tmp_path / "heartbeat"))
    Heartbeat("train", "steps", enabled=False).beat(1)  # a rank other than 0
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_heartbeat_never_fails_the_stage(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, str(tmp_path / "no-such-dir" / "heartbeat"))
    Heartbeat("train", "steps").beat(1)  # the watchdog, not the stage, reports a stale heartbeat


@pytest.fixture
def beats(monkeypatch) -> list[tuple[str, str, float]]:
    """Every beat any stage makes, before rate limiting: (stage, unit, progress)."""
    seen: list[tuple[str, str, float]] = []
    monkeypatch.setattr(Heartbeat, "beat", lambda self, progress: seen.append((self.stage, self.unit, progress)))
    return seen


def _rising(beats: list[tuple[str, str, float]], stage: str, unit: str) -> list[float]:
    values = [p for s, u, p in beats if (s, u) == (stage, unit)]
    assert values and values == sorted(values) and values[0] > 0, (stage, values)
    return values


def test_every_long_stage_beats_with_its_progress(beats, byte_corpus, tmp_path: Path) -> None:
    docs = stdlib_documents(200_000)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    text = tmp_path / "text"
    run_shard(ShardOptions(mode="prod", input=[str(corpus)], output_dir=text, lines_per_shard=20),
              console=Console(file=io.StringIO()))
    assert _rising(beats, "shard", "documents")[-1] == len(docs)

    bundle = prepare_tokenizer([text], tmp_path / "tok", 400)[0]
    sampled = _rising(beats, "tokenizer", "bytes sampled")
    result = encode_shards(text, tmp_path / "tokens", bundle, workers=1)
    assert _rising(beats, "encode", "bytes")[-1] == result.bytes_in
    assert sampled[-1] <= result.bytes_in

    out = train(validate_config(tiny_config(byte_corpus, tmp_path, num_steps=6, eval_every=100)))
    assert _rising(beats, "train", "steps") == list(range(1, out.step + 1)) and out.step == 6


def test_sft_prepare_beats_with_the_rows_it_reads(beats, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(5)]
    source = tmp_path / "alpaca.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(sft_app, ["prepare", "--stages", "instruct", "--no-hub", "--out", str(tmp_path / "sft"),
                                          "--source", f"yahma/alpaca-cleaned={source}"])
    assert result.exit_code == 0, result.output
    assert _rising(beats, "sft-data", "rows") == [1, 2, 3, 4, 5]
