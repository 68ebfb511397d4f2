"""Bad input as a new user meets it: each case ends in ONE line naming the file, key or flag, a
non-zero exit code as documented (2 = bad config, flags or data), no traceback and no damage.

Add new cases here, so the list of what podtrain answers cleanly grows in one place.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import BYTE_EOT, BYTE_VOCAB, byte_tokens, stdlib_documents, tiny_config
from training.cli import app as train_app
from training.token_shards import HEADER_SIZE, TokenShardHeader

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_line(text: str) -> str:
    """The whole of stderr, asserted to be a single line without a traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def shard_with_a_bad_id(path: Path, bad_id: int, at: int) -> None:
    """A shard whose header is fine (vocabulary 257) with one id past it: what a foreign or
    corrupted encoder leaves, and what the writer's own range check would refuse to produce."""
    tokens = byte_tokens(stdlib_documents(40_000))
    tokens[at] = bad_id
    header = TokenShardHeader(len(tokens), BYTE_VOCAB, BYTE_EOT, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.pack() + tokens.astype(np.uint16).tobytes())
    assert path.stat().st_size == HEADER_SIZE + 2 * len(tokens)


# 1. a token id >= model.vocab_size inside a shard whose header is fine ---------------------------
@pytest.mark.parametrize("position", [5, -3])  # in the first window read, and in a window a short run never reads
def test_token_id_past_the_vocabulary_names_file_and_id(byte_corpus, tmp_path, position) -> None:
    bad = tmp_path / "data" / "bad.tok"
    shard_with_a_bad_id(bad, 300, position)
    cfg = tiny_config(byte_corpus, tmp_path, train_data=str(bad), num_steps=2)
    result = CliRunner().invoke(train_app, [str(write_config(tmp_path, cfg))])
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert line.startswith(f"train: error: {bad}: token id 300 at position ") and line.endswith(">= model.vocab_size 257")
    assert not (tmp_path / "ckpt" / "final.safetensors").exists()


# 8. --resume naming no checkpoint ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(byte_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    path = write_config(out, tiny_config(byte_corpus, out, num_steps=10, eval_every=100))
    assert CliRunner().invoke(train_app, [str(path)]).exit_code == 0
    return path


@pytest.mark.parametrize("spec", ["latest", "nope.safetensors"])
def test_resume_of_no_such_checkpoint_lists_what_exists(trained, spec) -> None:
    result = CliRunner().invoke(train_app, [str(trained), "--resume", spec])
    assert result.exit_code == 2
    ckpt_dir = trained.parent / "ckpt"
    assert one_line(result.stderr) == (f"train: error: --resume {spec}: no such checkpoint; {ckpt_dir} holds best, final; "
                                       f"--resume auto takes the newest")


def test_resume_by_bare_tag_name_finds_it_in_checkpoint_dir(trained) -> None:
    result = CliRunner().invoke(train_app, [str(trained), "num_steps=11", "--resume", "final"])
    assert result.exit_code == 0, result.output
    assert "at step 10" in result.output


# 9. exit codes: data errors are "bad data" (2), as docs/training.md says -------------------------
def test_missing_train_data_exits_2_in_a_real_process(byte_corpus, tmp_path) -> None:
    cfg = tiny_config(byte_corpus, tmp_path, train_data=str(tmp_path / "nowhere"))
    proc = subprocess.run([sys.executable, "-m", "training", str(write_config(tmp_path, cfg))],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == f"train: error: train_data: {tmp_path / 'nowhere'} does not exist"


def test_exit_codes_in_docs_match_the_code() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert "| 2 | bad config, flags or data" in docs and "| 1 | an error while running" in docs


# 10. an override with an unknown key names the command line, not the file -------------------------
def test_unknown_override_names_the_command_line(byte_corpus, tmp_path) -> None:
    path = write_config(tmp_path, tiny_config(byte_corpus, tmp_path))
    result = CliRunner().invoke(train_app, [str(path), "optimizer.betas=0.9", "--dry-run"])
    assert result.exit_code == 2
    assert one_line(result.stderr) == "train: error: command line override optimizer.betas=0.9: optimizer.betas: unknown key"
