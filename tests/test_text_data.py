"""Text straight into `train`: parquet/jsonl/txt tokenized on the fly with a GPT-2-style tokenizer
folder saved by transformers, seed 003's order, and exact resume (training/text_data.py)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import stdlib_documents, tiny_config, wait_for_metric_lines
from training.config import validate_config
from training.data import DataError, resolve_inputs
from training.text_data import TextStream, inspect_file
from training.text_tokenizer import load_text_tokenizer
from training.tokenizer_bundle import TokenizerError
from training.trainer import train

VOCAB = 384
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return [d for d in stdlib_documents(400_000) if d.strip()]


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory, docs) -> Path:
    """A GPT-2-style tokenizer (byte-level BPE, <|endoftext|> as eos) saved by transformers' save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs[:20], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("gpt2-style")
    GPT2TokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                      unk_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def write_parquet(directory: Path, docs: list[str], files: int, row_group: int = 5) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(docs)), files)):
        path = directory / f"shard_{i:05d}.parquet"
        table = pa.table({"id": [f"doc{j}" for j in part], "text": [docs[j] for j in part]})
        pq.write_table(table, path, row_group_size=row_group)  # several row groups: a resume skips whole ones
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def parquet_corpus(tmp_path_factory, docs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wikipedia")
    write_parquet(root / "train", docs[8:], 3)
    write_parquet(root / "val", docs[:8], 1)
    return {"train": root / "train", "val": root / "val"}


def _expected_stream(tok, texts: list[str]) -> np.ndarray:
    return np.concatenate([np.array(tok.encode_batch([t])[0] + [tok.eot_id]) for t in texts if t])


def _stream(paths: list[Path], tok, shuffle: bool = True, seed: int = 7) -> TextStream:
    return TextStream([inspect_file(p, "train_data") for p in paths], tok, seed, VOCAB, shuffle=shuffle)


def test_transformers_gpt2_folder_loads_with_its_eos(gpt2_folder) -> None:
    tok = load_text_tokenizer(str(gpt2_folder))
    assert tok.eot_id == tok.tokenizer.token_to_id("<|endoftext|>") and tok.vocab_size == VOCAB
    # the literal marker inside a document is text, so the id always means a real boundary
    assert tok.eot_id not in tok.encode_batch(["a <|endoftext|> b"])[0]


def test_ranks_of_one_node_share_its_cores(monkeypatch) -> None:
    from training.text_tokenizer import share_cores

    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    share_cores()
    assert os.environ["RAYON_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    monkeypatch.setenv("RAYON_NUM_THREADS", "3")
    share_cores()
    assert os.environ["RAYON_NUM_THREADS"] == "3"  # the user's value stays


def test_vocab_and_merges_folder_loads_through_transformers(gpt2_folder, tmp_path) -> None:
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(gpt2_folder / "tokenizer.json")).model.save(str(tmp_path))  # vocab.json + merges.txt
    (tmp_path / "tokenizer_config.json").write_text((gpt2_folder / "tokenizer_config.json").read_text())
    slow = load_text_tokenizer(str(tmp_path))
    fast = load_text_tokenizer(str(gpt2_folder))
    text = "def f(x):\n    return x  # naïve"
    assert slow.encode_batch([text]) == fast.encode_batch([text]) and slow.eot_id == fast.eot_id


def test_hub_id_from_the_offline_cache(gpt2_folder, tmp_path, monkeypatch) -> None:
    """`tokenizer_path: gpt2` resolves through huggingface_hub's cache layout (HF_HUB_OFFLINE=1)."""
    commit = "0" * 40
    snap = tmp_path / "hub" / "models--gpt2" / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snap / name).write_bytes((gpt2_folder / name).read_bytes())
    (tmp_path / "hub" / "models--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--gpt2" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert load_text_tokenizer("gpt2").vocab_size == VOCAB
    with pytest.raises(TokenizerError, match="tokenizer_path not-cached/anywhere: no such file or folder"):
        load_text_tokenizer("not-cached/anywhere")


def test_windows_are_the_documents_end_to_end_without_padding(gpt2_folder, parquet_corpus, docs) -> None:
    tok = load_text_tokenizer(str(gpt2_folder))
    kind, paths = resolve_inputs(str(parquet_corpus["train"]), "train_data")
    assert kind == "text" and [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    stream = _stream(paths, tok, shuffle=False)
    T = 32
    rows = stream.read_rows(40, T)
    expected = _expected_stream(tok, docs[8:])
    flat = np.concatenate([rows[0], *[r[1:] for r in rows[1:]]])  # windows overlap by one token
    assert np.array_equal(flat, expected[: len(flat)])
    stream.close()


def test_each_epoch_permutes_the_files_and_reads_rows_linearly(gpt2_folder, tmp_path) -> None:
    tok = load_text_tokenizer(str(gpt2_folder))
    texts = [f"file{f} row{r}" for f in range(4) for r in range(3)]
    paths = write_parquet(tmp_path, texts, 4, row_group=2)
    stream = _stream(paths, tok, seed=3)
    per_epoch = sum(len(tok.encode_batch([t])[0]) + 1 for t in texts)
    flat = stream.read_rows(1, 3 * per_epoch)[0][:3 * per_epoch]
    ids = list(flat)
    decoded = tok.tokenizer.decode(ids, skip_special_tokens=False).split("<|endoftext|>")[:-1]
    epochs = [decoded[i * 12:(i + 1) * 12] for i in range(3)]
    orders = [[int(e[i * 3][4]) for i in range(4)] for e in epochs]
    for epoch, order in zip(epochs, orders):
        assert epoch == [f"file{f} row{r}" for f in order for r in range(3)]  # rows in file order
        assert sorted(order) == [0, 1, 2, 3]
    assert orders[0] == list(stream.order(0)) and orders[1] == list(stream.order(1)) and orders[0] != orders[1]
    stream.close()


@pytest.mark.parametrize("fmt", ["parquet", "jsonl.gz", "txt"])
def test_resume_from_any_window_continues_the_same_tokens(gpt2_folder, tmp_path, docs, fmt) -> None:
    tok = load_text_tokenizer(str(gpt2_folder))
    texts = [d[:400].replace("\n", " ") for d in docs[:30]]
    if fmt == "parquet":
        paths = write_parquet(tmp_path, texts, 3, row_group=4)
    else:
        paths = []
        for i, part in enumerate(np.array_split(np.arange(len(texts)), 3)):
            path = tmp_path / f"part{i}.{fmt}"
            lines = [json.dumps({"text": texts[j], "n": int(j)}) if fmt.startswith("jsonl") else texts[j] for j in part]
            data = ("\n".join(lines) + "\n").encode()
            path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
            paths.append(path)
    straight = _stream(paths, tok)
    reference = straight.read_rows(120, 50)
    assert straight.state_dict()["epoch"] >= 1  # the cut points below straddle an epoch boundary
    straight.close()
    for cut in (1, 7, 33, 61, 85, 99):
        first = _stream(paths, tok)
        first.read_rows(cut, 50)
        state = first.state_dict()
        first.close()
        again = _stream(paths, tok)
        again.load_state_dict(state)
        assert np.array_equal(again.read_rows(120 - cut, 50), reference[cut:]), (fmt, cut, state)
        again.close()


def test_seed004_processed_jsonl_shards_are_token_ids(tmp_path) -> None:
    """data/processed/pretrain/<dataset>/*.jsonl with packed input_ids, read without any tokenizer."""
    root = tmp_path / "processed" / "pretrain"
    rows = [list(range(i, i + 9)) for i in range(0, 100, 10)]
    for name, part in (("fineweb", rows[:5]), ("wikipedia", rows[5:])):
        (root / name).mkdir(parents=True)
        (root / name / "shard_000.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in part))
        (root / name / "manifest.log").write_text("not data\n")
    kind, paths = resolve_inputs(str(root), "train_data")
    assert kind == "text" and [p.parent.name for p in paths] == ["fineweb", "wikipedia"]
    stream = TextStream([inspect_file(p, "train_data") for p in paths], None, 0, 128, shuffle=False)
    assert list(stream.read_rows(1, 89)[0]) == [t for r in rows for t in r]
    stream.close()


def test_text_without_tokenizer_or_too_small_a_vocabulary_is_one_line(gpt2_folder, parquet_corpus, tmp_path) -> None:
    cfg = tiny_config({"train": parquet_corpus["train"], "val": parquet_corpus["val"]}, tmp_path)
    with pytest.raises(DataError, match="train_data: .*shard_0000.\\.parquet holds text: set tokenizer_path"):
        train(validate_config(cfg))
    cfg["tokenizer_path"] = str(gpt2_folder)
    cfg["model"]["vocab_size"] = 300
    with pytest.raises(DataError, match=f"tokenizer_path {gpt2_folder}: {VOCAB} ids, more than model.vocab_size=300"):
        train(validate_config(cfg))
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"body": ["x"]}), bad / "a.parquet")
    with pytest.raises(DataError, match="train_data: .*a.parquet: no 'text' column .*columns: body"):
        inspect_file(bad / "a.parquet", "train_data")


def _text_config(corpus, tok, out: Path, **overrides) -> dict:
    cfg = tiny_config(corpus, out, tokenizer_path=str(tok), **overrides)
    cfg["model"]["vocab_size"] = VOCAB
    return cfg


def test_train_from_parquet_resumes_exactly(gpt2_folder, parquet_corpus, tmp_path) -> None:
    extra = dict(num_steps=6, save_every=3, eval_every=3, num_workers=2, gradient_accumulation_steps=2, batch_size=4,
                 seq_len=32, scheduler__total_steps=6, keep_last_n=5)
    straight = train(validate_config(_text_config(parquet_corpus, gpt2_folder, tmp_path / "a", **extra)))
    first = train(validate_config(_text_config(parquet_corpus, gpt2_folder, tmp_path / "b", **{**extra, "num_steps": 3})))
    second = train(validate_config(_text_config(parquet_corpus, gpt2_folder, tmp_path / "b", **extra)), resume="auto")
    assert sorted(first.losses) == [1, 2, 3] and sorted(second.losses) == [4, 5, 6]
    assert {**first.losses, **second.losses} == straight.losses  # the same tokens, bit for bit in float32
    assert second.val_losses[6] == straight.val_losses[6]
    assert straight.val_losses[6] < straight.val_losses[0]
    rows = [json.loads(line) for line in (tmp_path / "a" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["data_wait"] <= 1.0 for r in rows if "loss" in r)  # share of each log window spent waiting for batches


def test_train_cli_with_seed003_keys(gpt2_folder, parquet_corpus, tmp_path) -> None:
    """Seed 003's minimal example, tiny: train_data folder of parquet shards, tokenizer_path, model keys."""
    cfg = {"train_data": str(parquet_corpus["train"]), "val_data": str(parquet_corpus["val"]),
           "tokenizer_path": str(gpt2_folder), "model": {"vocab_size": VOCAB, "d_model": 32, "num_layers": 1, "max_seq_len": 64},
           "seq_len": 32, "batch_size": 4, "num_steps": 3, "optimizer": {"lr": 3e-3}, "scheduler": {"type": "cosine", "warmup_steps": 1},
           "dtype": "float32", "checkpoint_dir": str(tmp_path / "ckpt"), "device": "cpu", "eval_every": 3, "eval_steps": 1,
           "num_workers": 1}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "training", str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "ckpt" / "final.safetensors").is_file()


def test_a_list_pools_folders_and_globs_and_kinds_do_not_mix(parquet_corpus, tmp_path) -> None:
    kind, paths = resolve_inputs([str(parquet_corpus["val"]), str(parquet_corpus["train"] / "shard_0000[12].parquet")])
    assert kind == "text" and [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert paths[0].parent.name == "val"
    (tmp_path / "a.tok").write_bytes(b"")
    with pytest.raises(DataError, match="train_data: mixes token shards and text files"):
        resolve_inputs([str(tmp_path / "a.tok"), str(parquet_corpus["val"])])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match="notes.md is neither token shards .* nor text"):
        resolve_inputs(str(tmp_path / "notes.md"))


@pytest.mark.slow
def test_two_ranks_on_text_match_one_process(gpt2_folder, parquet_corpus, tmp_path) -> None:
    """torchrun (gloo, DDP): each rank keeps its rows of the global block, so the losses are one process's."""
    from test_distributed import assert_close, launch, losses, write_config

    text = dict(tokenizer_path=str(gpt2_folder), model__vocab_size=VOCAB)
    launch(write_config(parquet_corpus, tmp_path / "one", "none", **text), "none")
    launch(write_config(parquet_corpus, tmp_path / "two", "ddp", **text), "ddp", timeout=300)
    assert_close(losses(tmp_path / "one"), losses(tmp_path / "two"), range(1, 7))


@pytest.mark.slow
def test_sigterm_on_text_then_resume_reads_the_same_tokens(gpt2_folder, parquet_corpus, tmp_path) -> None:
    """Stopped by SIGTERM mid-run (the prefetcher and the tokenizing thread busy), resumed: the per-step
    losses are those of a run never stopped, so no window was read twice or skipped."""
    def config(out: Path, steps: int) -> Path:
        cfg = _text_config(parquet_corpus, gpt2_folder, out, num_steps=steps, save_every=100000, eval_every=100000,
                           num_workers=2, batch_size=4, seq_len=32, scheduler__total_steps=1000)
        out.mkdir(parents=True, exist_ok=True)
        (out / "c.yaml").write_text(yaml.safe_dump(cfg))
        return out / "c.yaml"

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stopped = config(tmp_path / "stopped", 100000)
    proc = subprocess.Popen([sys.executable, "-m", "training", str(stopped)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "stopped" / "ckpt" / "metrics.jsonl"
    wait_for_metric_lines(metrics, 6, 120)
    proc.terminate()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    step = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    for path, steps, extra in ((stopped, step + 3, ["--resume", "auto"]), (config(tmp_path / "straight", step + 3), step + 3, [])):
        done = subprocess.run([sys.executable, "-m", "training", str(path), f"num_steps={steps}", *extra], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def losses(out: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "ckpt" / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
