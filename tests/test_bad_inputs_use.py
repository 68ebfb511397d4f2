"""Bad input to ``orchestrate evaluate | sample | export`` (issue 25): one line naming the file, exit 2,
and no temporary left behind by a killed export. Helpers: tests/test_bad_inputs.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, write_byte_tokenizer
from test_bad_inputs import one_line, orchestrate, write_config
from training.cli import app as train_app


@pytest.fixture(scope="module")
def checkpoint(byte_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("use")
    cfg = tiny_config(byte_corpus, out, num_steps=1, eval_every=100, tokenizer_path=str(write_byte_tokenizer(out / "tok")))
    assert CliRunner().invoke(train_app, [str(write_config(out, cfg))]).exit_code == 0
    return out / "ckpt" / "final"


# 14. a truncated checkpoint: one line naming the weights file ------------------------------------------
@pytest.mark.parametrize("command, prefix", [
    (["evaluate"], "evaluate: error: checkpoint {spec}: "),
    (["sample", "--prompt", "def"], "sample: error: checkpoint {spec}: "),
    (["export", "--to", "hf", "{out}"], "export: error: "),
])
def test_truncated_checkpoint_is_one_line_naming_the_file(checkpoint, tmp_path, command, prefix) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint.parent, ckpt)
    weights = ckpt / "final.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    spec = str(ckpt / "final")
    args = [command[0], spec, *(a.format(out=tmp_path / "hf") for a in command[1:])]
    result = orchestrate(*args)
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert line.startswith(prefix.format(spec=spec) + f"{weights}: unreadable weights ("), line
    assert not (tmp_path / "hf").exists()


# 15. a killed export's temporary folder is removed by the next export ---------------------------------
def test_stale_export_folder_is_removed_by_the_next_export(checkpoint, tmp_path) -> None:
    from training.hf import EXPORTING

    out = tmp_path / "hf"
    stale = tmp_path / ".hf.a1b2c3d4"  # what tempfile.mkdtemp(prefix=".hf.") left when the export was killed
    stale.mkdir()
    (stale / EXPORTING).touch()
    (stale / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / ".hf.settings"  # a folder of the user's that only looks alike: not ours, kept
    mine.mkdir()
    result = orchestrate("export", str(checkpoint), "--to", "hf", str(out))
    assert result.exit_code == 0, result.output
    assert not stale.exists() and mine.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.settings", "hf"]
    assert not (out / EXPORTING).exists()


# 16. evaluate --data on an empty file names the file ---------------------------------------------------
def test_evaluate_on_an_empty_file_names_it(checkpoint, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = orchestrate("evaluate", str(checkpoint), "--data", str(empty))
    assert result.exit_code == 2
    assert one_line(result.stderr) == (f"evaluate: error: --data {empty}: no batches to evaluate (fewer tokens than one "
                                       f"window of seq_len + 1)")
