"""Seed 004's pretrain.py flags on `train` (training/seed004_flags.py): what each becomes, and the
one-line refusals. The seed's whole command lines run in tests/test_coming_from.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from training.presets import find_preset
from training.seed004_flags import FlagError, translate

ROOT = Path(__file__).resolve().parents[1]


def test_each_flag_becomes_its_config_or_key() -> None:
    args = translate(["--preset", "mac_mini", "--tokenizer", "tok", "--processed-dir", "data/p", "--output-dir", "ck",
                      "--batch-size", "1", "--grad-accum=32", "--seq-len", "4096", "--learning-rate", "3e-4",
                      "--run-name", "mm", "--disable-eval", "--save-steps", "300", "--save-total-limit", "5",
                      "--active-expert", "0", "--expert-checkpoint-dir", "ex", "--resume", "auto", "num_steps=9"])
    assert args == [str(find_preset("mac_mini")), "--resume", "auto", "tokenizer_path=tok", "train_data=data/p",
                    "batch_size=1", "gradient_accumulation_steps=32", "optimizer.lr=3e-4", "seq_len=4096",
                    "model.max_seq_len=4096", "save_every=300", "keep_last_n=5", "active_expert=0", "expert_checkpoint_dir=ex",
                    "checkpoint_dir=ck/mm", "wandb_run_name=mm", "val_data=null", "num_steps=9"]
    assert translate(["--run-name", "r", "x.yaml"]) == ["x.yaml", "checkpoint_dir=checkpoints/r", "wandb_run_name=r"]
    assert translate(["x.yaml", "lr=1"]) == ["x.yaml", "lr=1"]  # nothing of seed 004's: untouched


@pytest.mark.parametrize("args, message", [
    (["--preset", "mac_mini", "x.yaml"], "--preset mac_mini: a config file is given too; keep one"),
    (["--preset", "mac_mini", "--config", "x.yaml"], "--preset mac_mini: a config file is given too; keep one"),
    (["--preset", "nope"], "--preset: no preset 'nope'; known: "),
    (["x.yaml", "--batch-size"], "--batch-size: needs a value"),
    (["x.yaml", "--dataset-limit", "fineweb=3"], "--dataset-limit: budgets the sources of a data recipe; give it to `orchestrate --data"),
])
def test_bad_flags_are_one_line(args: list[str], message: str) -> None:
    with pytest.raises(FlagError) as err:
        translate(args)
    assert str(err.value).startswith(message)


def test_the_command_line_fails_in_one_line_with_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "training", "configs/m3_medium.yaml", "--dataset-limit", "fineweb=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("train: error: --dataset-limit:")
