"""Data recipes (sharder/recipe.py, registry.py, mix.py, pdf.py) through the real sharder and `datasets`.

Every source is local (jsonl, parquet, a PDF made here) but goes through the same `datasets` calls a
hub id does; registry names are pointed at local folders by a user registry file."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from rich.console import Console

from sharder.errors import ShardError
from sharder.manifest import load_manifest
from sharder.pipeline import ShardOptions, run_shard
from sharder.recipe import load_recipe
from sharder.registry import SHIPPED_REGISTRY
from sharder.textshard import read_documents

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump({"data": data}), encoding="utf-8")
    return path


def shard(recipe: Path, out: Path, **kwargs) -> list[str]:
    run_shard(ShardOptions(data=recipe, output_dir=out, mode="prod", **kwargs), console=Console(file=io.StringIO()))
    manifest = load_manifest(out)
    return [doc for path in manifest.shard_paths(out) for doc in read_documents(path)]


def texts(prefix: str, count: int) -> list[dict]:
    return [{"text": f"{prefix} document {i}"} for i in range(count)]


def test_weighted_3_to_1_lands_within_2_percent_and_the_manifest_counts_each_source(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", texts("alpha", 2000))
    write_jsonl(tmp_path / "b.jsonl", texts("beta", 2000))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "sources": [{"type": "files", "path": "a.jsonl", "name": "a"}, {"type": "files", "path": "b.jsonl", "name": "b"}],
        "mix_strategy": "weighted", "source_weights": [3, 1],
    })
    docs = shard(recipe, tmp_path / "out", lines_per_shard=700)
    share = sum(d.startswith("alpha") for d in docs) / len(docs)
    assert abs(share - 0.75) <= 0.02, share
    totals = load_manifest(tmp_path / "out").source_totals()
    assert totals["a"][0] == sum(d.startswith("alpha") for d in docs)
    assert totals["b"][0] == sum(d.startswith("beta") for d in docs)
    assert totals["a"][1] == sum(len(d.encode()) for d in docs if d.startswith("alpha"))
    fingerprint = json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]["fingerprint"]
    assert fingerprint == load_recipe(recipe).fingerprint()


def test_round_robin_alternates_and_sequential_respects_budgets(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", texts("a", 5))
    write_jsonl(tmp_path / "b.jsonl", texts("b", 3))
    sources = [{"type": "files", "path": "a.jsonl", "name": "a"}, {"type": "files", "path": "b.jsonl", "name": "b"}]
    robin = shard(write_recipe(tmp_path / "robin.yaml", {"sources": sources}), tmp_path / "robin")
    assert robin == [f"{p} document {i}" for p, i in
                     [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("a", 4)]]
    side = (tmp_path / "robin" / "shard_00000.txt.sources").read_bytes()  # each line's source, uint16
    assert list(np.frombuffer(side, dtype="<u2")) == [0, 1, 0, 1, 0, 1, 0, 0]
    sequential = shard(write_recipe(tmp_path / "seq.yaml", {
        "sources": sources, "mix_strategy": "sequential", "limits": {"a": 4, "b": 2},
    }), tmp_path / "seq")
    assert sequential == ["a document 0", "a document 1", "a document 2", "a document 3", "b document 0", "b document 1"]


def test_dataset_limit_flag_sets_document_budgets_over_the_recipe(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", texts("a", 5))
    write_jsonl(tmp_path / "b.jsonl", texts("b", 3))
    recipe = write_recipe(tmp_path / "r.yaml", {"mix_strategy": "sequential", "limits": {"a": 4}, "sources": [
        {"type": "files", "path": "a.jsonl", "name": "a"}, {"type": "files", "path": "b.jsonl", "name": "b"}]})
    assert shard(recipe, tmp_path / "out", dataset_limit="a=2,b=1") == ["a document 0", "a document 1", "b document 0"]
    assert load_recipe(recipe, "a=2").fingerprint() != load_recipe(recipe).fingerprint()  # a new budget reshards
    for flag, message in (("a=0", "--dataset-limit 'a=0': expected name=N,... with N >= 1 (got 'a=0')"),
                          ("c=3", "data.limits.c: no such source")):
        with pytest.raises(ShardError, match=re.escape(message)):
            ShardOptions(data=recipe, output_dir=tmp_path / "bad", dataset_limit=flag)
    with pytest.raises(ShardError, match="--dataset-limit: budgets recipe sources by name; give the recipe with --data"):
        ShardOptions(input=[str(tmp_path / "a.jsonl")], dataset_limit="a=2")
    assert not (tmp_path / "bad").exists()


def test_qa_fields_are_formatted_exactly_and_min_text_length_applies_per_source(tmp_path):
    rows = [{"question": "Why?", "answer": "Because.\nTwo lines."}, {"question": "Who", "answer": "me"},
            {"question": "Null answer", "answer": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "sources": [{"type": "files", "path": "qa.parquet", "fields": ["question", "answer"],
                     "format": "Q: {question}\nA: {answer}"}],
        "min_text_length": 15,
    })
    assert shard(recipe, tmp_path / "out") == ["Q: Why?\nA: Because.\nTwo lines."]


@pytest.mark.parametrize(("data", "message"), [
    ({"sources": ["wikipedia", "c4"], "mix_strategy": "weighted", "source_weights": [1, 2, 3]},
     "data.source_weights: 3 weights for 2 sources (wikipedia, c4)"),
    ({"sources": ["wikipedia", "wikipeda"]}, "data.sources[1]: unknown source 'wikipeda' (known: "),
    ({"sources": ["c4"], "mix_strategy": "blend"}, "data.mix_strategy: Input should be 'round_robin', 'sequential' or 'weighted'"),
    ({"sources": [{"type": "hf", "dataset": "x/y", "fields": ["q"], "format": "{q} {a}"}]},
     "format uses a which is not in fields"),
    ({"sources": ["c4"], "limits": {"wikipedia": 3}}, "data.limits.wikipedia: no such source"),
    ({"sources": ["c4"], "limits": {"c4": 0}}, "data.limits.c4.documents: Input should be greater than or equal to 1"),
    ({"sources": ["c4"], "curate": {"quality": ["gopher"]}}, "unknown quality filter 'gopher'"),
    ({"sources": ["c4", {"type": "pdf"}]}, "data.sources[1]: type pdf needs 'path'"),
    ({"sources": ["c4"], "custom_sources": [{"type": "hf", "dataset": "x/y", "split": 3}]},
     "data.custom_sources[0].split: Input should be a valid string (got 3)"),
])
def test_bad_recipes_are_refused_before_any_work_in_one_line(tmp_path, data, message):
    with pytest.raises(ShardError) as info:
        load_recipe(write_recipe(tmp_path / "r.yaml", data))
    assert message in str(info.value) and str(info.value).startswith(str(tmp_path / "r.yaml"))
    assert "\n" not in str(info.value)


def test_cli_missing_field_names_the_source_and_its_fields_exit_2_nothing_written(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "response": "r"}])
    recipe = write_recipe(tmp_path / "r.yaml", {"sources": [
        {"type": "files", "path": "qa.jsonl", "name": "nq", "fields": ["question", "answer"],
         "format": "Q: {question}\nA: {answer}"}]})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sharder", "--data", str(recipe), "--output-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --data {recipe}: source nq: fields: no field 'answer' in nq (fields: question, response)"
    ]
    assert not out.exists()


_ARROW = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64()}


def _local_hub_folder(root: Path, name: str, entry: dict) -> Path:
    """A folder laid out like the hub dataset (README configs + parquet with the registry's schema), or,
    for an entry read from the Hub's parquet conversion (revision refs/convert/parquet), like that
    branch: ``<config>/partial-<split>/0000.parquet`` and no card, as for datasets past 5 GB."""
    folder = root / name
    config = entry.get("config") or "default"
    schema = pa.schema([(col, _ARROW[kind]) for col, kind in entry["columns"].items()])
    rows = []
    for i in range(4):
        row = {col: (f"{name} {col} {i} " * 3 if kind == "string" else i) for col, kind in entry["columns"].items()}
        rows.append(row)
    if entry.get("revision") == "refs/convert/parquet":
        (folder / entry["data_dir"] / f"partial-{entry['split']}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / entry["data_dir"] / f"partial-{entry['split']}" / "0000.parquet")
        return folder
    (folder / config).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / config / f"{entry['split']}-00000.parquet")
    card = {"configs": [{"config_name": config, "data_files": [
        {"split": entry["split"], "path": f"{config}/{entry['split']}-*.parquet"}]}]}
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n", encoding="utf-8")
    return folder


def test_every_registry_source_loads_its_schema_through_the_hub_code_path(tmp_path):
    shipped = yaml.safe_load(SHIPPED_REGISTRY.read_text())["sources"]
    streamable = shipped
    assert {"fineweb", "fineweb-edu", "wikipedia", "c4", "common_crawl", "pile_subset", "openwebtext", "bookcorpus"} <= set(streamable)
    assert shipped["openwebtext"]["revision"] == shipped["bookcorpus"]["revision"] == "refs/convert/parquet"
    user = {"version": 1, "sources": {name: {**entry, "dataset": str(_local_hub_folder(tmp_path / "hub", name, entry))}
                                      for name, entry in streamable.items()}}
    (tmp_path / "my_sources.yaml").write_text(yaml.safe_dump(user), encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", {"registry": "my_sources.yaml", "sources": list(streamable),
                                                "mix_strategy": "sequential", "limits": {"wikipedia": 2}})
    docs = shard(recipe, tmp_path / "out")
    totals = load_manifest(tmp_path / "out").source_totals()
    assert {name: counts[0] for name, counts in totals.items()} == {n: (2 if n == "wikipedia" else 4) for n in streamable}
    assert docs[0] == "fineweb text 0 " * 3
    questions = [d for d in docs if d.startswith("Q: ")]
    assert f"Q: {'natural_questions query 0 ' * 3}\nA: {'natural_questions answer 0 ' * 3}" in questions
    assert f"Q: {'stackexchange question 0 ' * 3}\nA: {'stackexchange response_j 0 ' * 3}" in questions  # seed 004's names
    assert "github code 0 " * 3 in docs
    assert {"openwebtext text 3 " * 3, "bookcorpus text 3 " * 3} <= set(docs)  # through revision + data_dir


def _make_pdf(path: Path, pages: list[list[str]]) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), pagesize=A4)
    for paragraphs in pages:
        text = pdf.beginText(40, 800)
        for paragraph in paragraphs:
            for line in textwrap.wrap(paragraph, 90):
                text.textLine(line)
        pdf.drawText(text)
        pdf.showPage()
    pdf.save()


def test_pdf_folder_is_extracted_recursively_in_3_to_5k_chunks_at_paragraph_ends_with_file_and_page(tmp_path):
    from sharder.mix import TEXT_COLUMN, source_dataset
    from sharder.pdf import generate_chunks
    from sharder.recipe import SourceConfig

    (tmp_path / "pdfs" / "nested").mkdir(parents=True)
    sentence = "The quick brown fox jumps over the lazy dog near the river bank. "
    pages = [[f"Page {p} paragraph {i}. " + sentence * 3 for i in range(10)] for p in range(1, 5)]
    _make_pdf(tmp_path / "pdfs" / "nested" / "book.pdf", pages)
    pdf = str(tmp_path / "pdfs" / "nested" / "book.pdf")
    chunks = list(generate_chunks([pdf], 4000))
    assert [(c["file"], c["page"]) for c in chunks][0] == (pdf, 1) and chunks[-1]["last_page"] == 4
    assert all(a["last_page"] <= b["page"] for a, b in zip(chunks, chunks[1:]))
    texts = [c["text"] for c in chunks]
    assert len(texts) >= 2
    joined = " ".join(t.replace("\n", " ") for t in texts)
    for p in range(1, 5):
        assert f"Page {p} paragraph 9." in joined
    for text in texts[:-1]:
        assert 3000 <= len(text) <= 5000, len(text)
        assert text.rstrip().endswith("bank."), text[-40:]
    source = source_dataset(SourceConfig(type="pdf", path=str(tmp_path / "pdfs")), 0, 1, "test", str(tmp_path), None)
    assert [r[TEXT_COLUMN] for r in source.with_format(None)] == texts
    recipe = write_recipe(tmp_path / "r.yaml", {"sources": [{"type": "pdf", "path": "pdfs", "name": "books"}]})
    assert shard(recipe, tmp_path / "out") == texts


def _start_sharder(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sharder", *args], cwd=ROOT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_while_sharding_a_mixed_recipe_then_rerun_is_byte_identical(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", texts("alpha", 6000))
    pq.write_table(pa.Table.from_pylist([{"q": f"q{i}", "a": f"a{i}"} for i in range(4000)]), tmp_path / "qa.parquet")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "sources": [{"type": "files", "path": "a.jsonl"},
                    {"type": "files", "path": "qa.parquet", "fields": ["q", "a"], "format": "Q: {q}\nA: {a}"}],
        "mix_strategy": "weighted", "source_weights": [2, 1], "stop": "all_exhausted",
    })
    args = ["--data", str(recipe), "--mode", "prod", "--lines-per-shard", "250"]
    reference = tmp_path / "reference"
    assert subprocess.run([sys.executable, "-m", "sharder", *args, "--output-dir", str(reference)],
                          cwd=ROOT, capture_output=True).returncode == 0
    out = tmp_path / "killed"
    proc = _start_sharder([*args, "--output-dir", str(out)])
    deadline = time.monotonic() + 60
    while not (out / "shard_00004.txt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not load_manifest(out).complete
    rerun = subprocess.run([sys.executable, "-m", "sharder", *args, "--output-dir", str(out)], cwd=ROOT,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    ref, got = load_manifest(reference), load_manifest(out)
    assert [(s.name, s.sha256) for s in got.shards] == [(s.name, s.sha256) for s in ref.shards]
    assert got.source_totals() == ref.source_totals() == {"a.jsonl": [6000, ref.source_totals()["a.jsonl"][1]],
                                                          "qa.parquet": [4000, ref.source_totals()["qa.parquet"][1]]}


@pytest.mark.slow
def test_orchestrate_data_recipe_shards_curates_and_tokenizes_the_curated_shards(tmp_path):
    from conftest import stdlib_documents

    docs = [d.replace("\n", " ") for d in stdlib_documents(400_000)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs[: len(docs) // 2]] * 2)  # every document twice
    write_jsonl(tmp_path / "b.jsonl", [{"body": d} for d in docs[len(docs) // 2:]])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "sources": [{"type": "files", "path": "a.jsonl"}, {"type": "files", "path": "b.jsonl", "text_field": "body"}],
        "curate": {"dedup": {"minhash": False}},
    })
    workspace = tmp_path / "ws"
    args = [sys.executable, "-m", "orchestrator", "--mode", "local", "--workspace", str(workspace), "--data", str(recipe),
            "--config", "configs/demo.yaml", "--experiment", "mix", "--stop-after", "tokenizer", "--val-ratio", "0.1"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    sharded = load_manifest(workspace / "datasets" / "train" / "mix")
    curated = load_manifest(workspace / "datasets" / "curated" / "train" / "mix")
    assert curated.total_lines < sharded.total_lines  # the copies of a.jsonl are gone
    assert set(sharded.source_totals()) == {"a.jsonl", "b.jsonl"}
    assert "[stage] curate: done" in proc.stdout
    assert list((workspace / "cache" / "mix" / "tokens" / "train").glob("*"))
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert again.returncode == 0 and "[stage] curate: done earlier with the same inputs, skipped" in again.stdout


def _word_tokenizer(path: Path, words: list[str]) -> Path:
    """A tokenizer.json giving one id per whitespace-separated word, so token counts are word counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(words)))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def test_limits_in_tokens_take_documents_until_the_budget_is_reached_and_the_counter_is_part_of_the_recipe(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", texts("alpha", 50))  # "alpha document i": 3 tokens + end-of-text each
    write_jsonl(tmp_path / "b.jsonl", [{"text": "beta " * (i + 1)} for i in range(10)])  # i+1 tokens + 1
    _word_tokenizer(tmp_path / "tokenizer.json", ["alpha", "document", "beta"])
    data = {"sources": [{"type": "files", "path": "a.jsonl", "name": "a"}, {"type": "files", "path": "b.jsonl", "name": "b"}],
            "mix_strategy": "sequential", "limits": {"a": {"tokens": 30}, "b": {"tokens": 10}}, "token_counter": "."}
    docs = shard(write_recipe(tmp_path / "r.yaml", data), tmp_path / "out")
    # a: 4 tokens a document, the 8th reaches 32 >= 30; b: 2+3+4 = 9, the 4th reaches 14 >= 10
    assert docs == [f"alpha document {i}" for i in range(8)] + ["beta " * (i + 1) for i in range(4)]
    assert {k: v[0] for k, v in load_manifest(tmp_path / "out").source_totals().items()} == {"a": 8, "b": 4}
    first = load_recipe(tmp_path / "r.yaml").fingerprint()
    _word_tokenizer(tmp_path / "tokenizer.json", ["alpha", "beta"])  # another counter: another recipe
    assert load_recipe(tmp_path / "r.yaml").fingerprint() != first
    with pytest.raises(ShardError, match=r"r.yaml: data.token_counter: needed by the budget in tokens of a \("):
        load_recipe(write_recipe(tmp_path / "r.yaml", {**data, "token_counter": None}))
    with pytest.raises(ShardError, match=r"r.yaml: data.token_counter: no such file .*nowhere.json$"):
        load_recipe(write_recipe(tmp_path / "r.yaml", {**data, "token_counter": "nowhere.json"}))
    with pytest.raises(ShardError, match=r"data.limits.a: give exactly one of 'documents' or 'tokens'"):
        load_recipe(write_recipe(tmp_path / "r.yaml", {**data, "limits": {"a": {"documents": 3, "tokens": 4}}}))


def test_a_recipe_inside_a_training_config_is_its_data_section(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", texts("alpha", 3))
    config = {"name": "mix", "model": {"hidden_size": 64, "num_layers": 2}, "train": {"lr": 0.003},
              "data": {"sources": [{"type": "files", "path": "a.jsonl", "name": "a"}], "min_text_length": 5}}
    (tmp_path / "preset.json").write_text(json.dumps(config), encoding="utf-8")
    recipe = load_recipe(tmp_path / "preset.json")
    assert recipe.labels == ["a"] and recipe.min_text_length == 5
    assert shard(tmp_path / "preset.json", tmp_path / "out") == [f"alpha document {i}" for i in range(3)]
