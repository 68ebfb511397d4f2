"""Seed 004's fine-tuning sources, offline: a few rows in each source's real schema, written by the test
as the hub serves them (jsonl or parquet), read through the same ``datasets.load_dataset`` path, must
become exactly the canonical records; malformed rows are counted and reported by source and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset
from typer.testing import CliRunner

from orchestrator.sft.cli import app
from sharder.argv import spread_multi_value_flags

GLAIVE_SYSTEM = ('SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n'
                 '{\n    "name": "get_exchange_rate",\n    "parameters": {"type": "object"}\n}')
GLAIVE_CHAT = ("USER: Hi, I need to know the exchange rate from USD to EUR.\n\n\n"
               "ASSISTANT: <functioncall> {\"name\": \"get_exchange_rate\", \"arguments\": '{\"base_currency\": \"USD\", "
               "\"target_currency\": \"EUR\"}'} <|endoftext|>\n\n\n"
               "FUNCTION RESPONSE: {\"exchange_rate\": 0.85}\n\n\n"
               "ASSISTANT: The current exchange rate from USD to EUR is 0.85. <|endoftext|>\n\n\n"
               "USER: Thanks!\n\n\nASSISTANT: You're welcome! <|endoftext|>\n\n\n")

# (source, config or None, file format, rows in the source's own schema, expected canonical records)
CASES = [
    ("yahma/alpaca-cleaned", None, "jsonl",
     [{"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
      {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
      {"instruction": "", "input": "", "output": "orphan"}],
     [{"instruction": "Give three tips for staying healthy.", "output": "1. Eat well."},
      {"instruction": "Translate to French.\n\nGood morning", "output": "Bonjour"}]),
    ("zetavg/ShareGPT-Processed", None, "parquet",
     [{"id": "a1", "lang": "en", "conversations": [
         {"from": "human", "value": "What is 2+2?", "markdown": None, "opencc_converted_markdown": None},
         {"from": "gpt", "value": "4", "markdown": "4", "opencc_converted_markdown": None}]},
      {"id": "a2", "lang": "en", "conversations": [
         {"from": "human", "value": "hello", "markdown": None, "opencc_converted_markdown": None}]}],
     [{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}]),
    ("HuggingFaceH4/ultrachat_200k", None, "parquet",
     [{"prompt": "Name a color.", "prompt_id": "p1",
       "messages": [{"content": "Name a color.", "role": "user"}, {"content": "Blue.", "role": "assistant"},
                    {"content": "Another?", "role": "user"}, {"content": "Red.", "role": "assistant"}]}],
     [{"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
                    {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]}]),
    ("glaiveai/glaive-function-calling-v2", None, "jsonl",
     [{"system": GLAIVE_SYSTEM, "chat": GLAIVE_CHAT},
      {"system": "SYSTEM: You are a helpful assistant, with no access to external functions.",
       "chat": "USER: Tell me a joke.\n\n\nASSISTANT: Why did the chicken cross the road? <|endoftext|>\n\n\n"},
      {"system": GLAIVE_SYSTEM, "chat": "USER: rate?\n\n\nASSISTANT: <functioncall> {\"name\": \"get_exchange_rate\", "
                                        "\"arguments\": '{broken'} <|endoftext|>\n\n\n"}],
     [{"system": GLAIVE_SYSTEM[len("SYSTEM: "):], "user_message": "Hi, I need to know the exchange rate from USD to EUR.",
       "tool_calls": [{"name": "get_exchange_rate", "arguments": {"base_currency": "USD", "target_currency": "EUR"}}],
       "tool_results": [{"content": "{\"exchange_rate\": 0.85}"}],
       "assistant_response": "The current exchange rate from USD to EUR is 0.85."},
      {"system": "You are a helpful assistant, with no access to external functions.", "user_message": "Tell me a joke.",
       "tool_calls": [], "tool_results": [], "assistant_response": "Why did the chicken cross the road?"}]),
    ("gsm8k", "main", "parquet",
     [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
       "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"},
      {"question": "No answer line?", "answer": "just steps"}],
     [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
       "reasoning": "In May she sold 48/2 = 24 clips.\nIn all 48+24 = 72 clips.", "answer": "72"}]),
    ("aqua_rat", "raw", "jsonl",
     [{"question": "A car goes 60 km in 1 h. How far in 3 h?", "options": ["A)120", "B)180", "C)200"],
       "rationale": "60 * 3 = 180", "correct": "B"}],
     [{"question": "A car goes 60 km in 1 h. How far in 3 h?\nA)120\nB)180\nC)200", "reasoning": "60 * 3 = 180", "answer": "B)180"}]),
    ("EleutherAI/hendrycks_math", "algebra", "parquet",
     [{"problem": "Solve $x+1=3$.", "level": "Level 1", "type": "Algebra", "solution": "Subtract 1: $x=\\boxed{2}$."},
      {"problem": "No box.", "level": "Level 1", "type": "Algebra", "solution": "It is 2."}],
     [{"question": "Solve $x+1=3$.", "reasoning": "Subtract 1: $x=\\boxed{2}$.", "answer": "2"}]),
    ("EleutherAI/hendrycks_math", "number_theory", "jsonl",
     [{"problem": "What is $\\frac{6}{3}$?", "level": "Level 2", "type": "Number Theory",
       "solution": "$\\frac{6}{3} = \\boxed{\\frac{4}{2}}$"}],
     [{"question": "What is $\\frac{6}{3}$?", "reasoning": "$\\frac{6}{3} = \\boxed{\\frac{4}{2}}$", "answer": "\\frac{4}{2}"}]),
]
STAGE = {"yahma/alpaca-cleaned": "instruct", "zetavg/ShareGPT-Processed": "instruct", "HuggingFaceH4/ultrachat_200k": "instruct",
         "glaiveai/glaive-function-calling-v2": "tool", "gsm8k": "reasoning", "aqua_rat": "reasoning",
         "EleutherAI/hendrycks_math": "reasoning"}


def _write(path: Path, fmt: str, rows: list[dict]) -> Path:
    if fmt == "parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(args: list[str]):
    return CliRunner().invoke(app, spread_multi_value_flags(args, ("--stages", "--source", "--file")))


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))


def _source_flags(tmp_path: Path) -> list[str]:
    flags = []
    for i, (name, config, fmt, rows, _) in enumerate(CASES):
        path = _write(tmp_path / f"src{i}.{fmt}", fmt, rows)
        flags += ["--source", f"{name}/{config}={path}" if config and name == "EleutherAI/hendrycks_math" else f"{name}={path}"]
    return flags


def test_every_source_converts_exactly_and_malformed_rows_are_reported(tmp_path: Path) -> None:
    out = tmp_path / "sft"
    result = _run(["prepare", "--stages", "instruct", "tool", "reasoning", "--no-hub", "--out", str(out), *_source_flags(tmp_path)])
    assert result.exit_code == 0, result.output
    for stage in ("instruct", "tool", "reasoning"):
        expected = [rec for name, _, _, _, recs in CASES if STAGE[name] == stage for rec in recs]
        got = [json.loads(line) for line in (out / f"{stage}_data.jsonl").read_text().splitlines()]
        assert got == expected, stage
    report = json.loads((out / "report.json").read_text())
    bad = {r["source"]: (r["malformed"], r["examples"]) for r in report["sources"]}
    assert bad["yahma/alpaca-cleaned"] == (1, ["yahma/alpaca-cleaned row 2: instruction: missing or empty"])
    assert bad["zetavg/ShareGPT-Processed"] == (1, ["zetavg/ShareGPT-Processed row 1: conversations: no gpt turn"])
    assert bad["glaiveai/glaive-function-calling-v2"][0] == 1
    assert bad["glaiveai/glaive-function-calling-v2"][1][0].startswith("glaiveai/glaive-function-calling-v2 row 2: chat: function call is not JSON")
    assert bad["gsm8k"] == (1, ["gsm8k row 1: answer: no '#### <answer>' line after the steps"])
    assert bad["EleutherAI/hendrycks_math"] == (1, ["EleutherAI/hendrycks_math/algebra row 1: solution: no \\boxed{} answer"])
    assert "glaiveai/glaive-function-calling-v2 row 2" in result.output


def test_rerun_skips_done_sources_dedups_and_limits(tmp_path: Path) -> None:
    out = tmp_path / "sft"
    alpaca = CASES[0][3]
    src = _write(tmp_path / "alpaca.jsonl", "jsonl", alpaca + alpaca)  # every record twice
    user = tmp_path / "mine.jsonl"
    user.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n"
                    + json.dumps({"question": "q", "reasoning": "r", "answer": "a"}) + "\n{not json\n")
    args = ["prepare", "--stages", "instruct", "--no-hub", "--out", str(out), "--source", f"alpaca-cleaned={src}",
            "--file", f"instruct={user}"]
    first = _run(args)
    assert first.exit_code == 0, first.output
    lines = (out / "instruct_data.jsonl").read_text().splitlines()
    assert [json.loads(x)["instruction"] for x in lines] == ["Give three tips for staying healthy.", "Translate to French.\n\nGood morning", "Say hi"]
    assert "2 duplicates dropped" in first.output
    assert f"{user}:2: a reasoning record in the instruct file" in first.output  # file:line, as an editor counts
    second = _run(args)
    assert second.output.count("done earlier, skipped") == 2
    assert (out / "instruct_data.jsonl").read_text().splitlines() == lines
    limited = _run([*args, "--instruct-limit", "2"])
    assert len((out / "instruct_data.jsonl").read_text().splitlines()) == 2, limited.output


@pytest.mark.parametrize("args, message", [
    (["--source", "nope=x.jsonl"], "--source 'nope=x.jsonl': 'nope' is not a seed-004 source"),
    (["--source", "gsm8k=/no/such.parquet"], "/no/such.parquet is not a file"),
    (["--file", "chat=x.jsonl"], "expected STAGE=PATH with STAGE one of instruct, tool, reasoning"),
    (["--stages", "instruct", "--no-hub"], "--stages instruct: no inputs"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = _run(["prepare", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "o" / "instruct_data.jsonl").exists()
