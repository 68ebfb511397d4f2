"""nanoGPT as typed (seed 001): `train key=value ...` with no config starts from nanoGPT's train.py
defaults (configs/gpt2_124m.yaml), `dataset=NAME` reads data/NAME/{train,val}.bin with meta.pkl's
vocabulary, and such a run resumes exactly."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import stdlib_documents
from training.cli import app
from training.config import ConfigError, load_config
from training.model import build_meta_model, count_parameters
from training.presets import NANOGPT_DEFAULTS, list_presets
from training.token_shards import TokenShardError, read_header
from training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# seed 001's line, tiny and on a CPU: nanoGPT's own names, nothing else
TINY = ["dataset=chars", "n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "gradient_accumulation_steps=1",
        "compile=False", "device=cpu", "dtype=float32", "eval_interval=3", "eval_iters=1", "warmup_iters=1",
        "lr_decay_iters=6", "learning_rate=3e-3", "out_dir=out"]


@pytest.fixture
def nanogpt_dir(tmp_path: Path) -> Path:
    """What nanoGPT's data/shakespeare_char/prepare.py leaves: train.bin, val.bin (uint16) and meta.pkl."""
    text = "".join(stdlib_documents(120_000))
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    data = tmp_path / "data" / "chars"
    data.mkdir(parents=True)
    split = int(0.9 * len(ids))
    ids[:split].tofile(data / "train.bin")
    ids[split:].tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as fh:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, fh)
    return tmp_path


def test_gpt2_124m_holds_nanogpts_defaults() -> None:
    cfg = load_config(NANOGPT_DEFAULTS)
    m = cfg.model
    assert (m.num_layers, m.attention.n_heads, m.d_model, m.vocab_size, m.max_seq_len, cfg.seq_len) == (12, 12, 768, 50304, 1024, 1024)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.num_steps, cfg.scheduler.warmup_steps) == (12, 40, 600000, 2000)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.beta2, cfg.optimizer.grad_clip) == (6e-4, 0.1, 0.95, 1.0)
    assert cfg.optimizer.lr * cfg.scheduler.min_lr_ratio == pytest.approx(6e-5) and cfg.scheduler.total_steps == 600000
    assert (m.dropout, m.bias, m.positional.type, m.norm.type, m.ffn.type) == (0.0, False, "learned", "layernorm", "gelu")
    n = count_parameters(build_meta_model(m))
    non_embedding = n - m.max_seq_len * m.d_model  # nanoGPT's get_num_params() leaves out the position embeddings
    assert f"{non_embedding / 1e6:.2f}M" == "123.59M"  # what nanoGPT's model.py prints for this config


def test_key_values_without_a_config_start_from_nanogpt_defaults(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["batch_size=128", "compile=False", "--dry-run"])  # seed 001's first line
    assert result.exit_code == 0, result.output
    assert f"no config given: nanoGPT's train.py defaults from {NANOGPT_DEFAULTS}" in result.output
    assert "batch_size: 128" in result.output and "compile_model: false" in result.output
    assert "parameters: 124,373,760" in result.output


def test_config_flag_and_the_menu(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["--config", str(NANOGPT_DEFAULTS), "n_layer=6", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"config {NANOGPT_DEFAULTS} with n_layer=6" in result.output and "num_layers: 6" in result.output
    twice = CliRunner().invoke(app, [str(NANOGPT_DEFAULTS), "--config", str(NANOGPT_DEFAULTS)])
    assert twice.exit_code == 2 and "give the config once" in twice.stderr
    names = [path.name for path, _ in list_presets()]
    assert "gpt2_124m.yaml" in names and "sources.yaml" not in names  # the registry is not a training preset


def test_dataset_reads_bins_and_meta_vocabulary(nanogpt_dir, monkeypatch) -> None:
    monkeypatch.chdir(nanogpt_dir)
    notes: list[str] = []
    cfg = load_config(NANOGPT_DEFAULTS, ["dataset=chars"], notes)
    vocab = pickle.loads((nanogpt_dir / "data/chars/meta.pkl").read_bytes())["vocab_size"]
    assert (cfg.train_data, cfg.val_data, cfg.model.vocab_size) == ("data/chars/train.bin", "data/chars/val.bin", vocab)
    assert notes == [f"dataset (nanoGPT name) set train_data = data/chars/train.bin, val_data = data/chars/val.bin, "
                     f"model.vocab_size = {vocab}"]
    header = read_header("data/chars/train.bin")
    assert header.num_tokens == (nanogpt_dir / "data/chars/train.bin").stat().st_size // 2 and header.vocab_size == vocab
    (nanogpt_dir / "data/chars/meta.pkl").unlink()  # no meta.pkl: GPT-2's ids, as nanoGPT assumes
    assert load_config(NANOGPT_DEFAULTS, ["dataset=chars"]).model.vocab_size == 50304
    assert read_header("data/chars/train.bin").vocab_size == 50257


def test_meta_pkl_that_builds_objects_is_refused(nanogpt_dir, monkeypatch) -> None:
    monkeypatch.chdir(nanogpt_dir)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (nanogpt_dir / "data/chars/meta.pkl").write_bytes(pickle.dumps({"vocab_size": Evil()}))
    with pytest.raises(ConfigError, match="dataset=chars: .*meta.pkl: not a nanoGPT meta.pkl with a vocab_size .*refusing to construct"):
        load_config(NANOGPT_DEFAULTS, ["dataset=chars"])
    with pytest.raises(TokenShardError, match="refusing to construct posix.system"):
        read_header("data/chars/train.bin")


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_nanogpt_line_trains_from_bins_and_resumes_exactly(nanogpt_dir, monkeypatch) -> None:
    """The line as typed (a subprocess), then the same config stopped at step 3 and resumed (in process)."""
    straight = subprocess.run([sys.executable, "-m", "training", *TINY, "max_iters=6"], cwd=nanogpt_dir, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    assert "no config given: nanoGPT's train.py defaults" in straight.stdout
    (nanogpt_dir / "out").rename(nanogpt_dir / "straight")
    monkeypatch.chdir(nanogpt_dir)
    first = train(load_config(NANOGPT_DEFAULTS, [*TINY, "max_iters=3"]))
    second = train(load_config(NANOGPT_DEFAULTS, [*TINY, "max_iters=6"]), resume="auto")
    assert (first.step, second.step) == (3, 6)
    expected = _losses(nanogpt_dir / "straight")
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert {**first.losses, **second.losses} == expected  # the same windows, bit for bit
