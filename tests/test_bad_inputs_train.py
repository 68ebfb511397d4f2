"""Bad input to ``train`` (issue 25): each case one clear line or one warning, the right exit code, and
nothing damaged saved. The helpers are tests/test_bad_inputs.py's."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import BYTE_EOT, BYTE_VOCAB, byte_tokens, stdlib_documents, tiny_config
from test_bad_inputs import ENV, one_line, write_config
from training.cli import app as train_app
from training.token_shards import TokenShardHeader, write_token_shard


def train(*args: str):
    return CliRunner().invoke(train_app, list(args))


def config_in(directory: Path, cfg: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory, cfg)


# 1. an alias and its canonical key on one command line, with different values ---------------------
@pytest.mark.parametrize("first, second, path", [
    ("n_layer=3", "model.num_layers=2", "model.num_layers"),
    ("learning_rate=1e-3", "optimizer.lr=2e-3", "optimizer.lr"),
    ("max_iters=5", "num_steps=6", "num_steps"),
    ("num_steps=6", "max_steps=5", "num_steps"),
])
def test_alias_clash_on_the_command_line_is_refused(byte_corpus, tmp_path, first, second, path) -> None:
    config = write_config(tmp_path, tiny_config(byte_corpus, tmp_path))
    result = train(str(config), first, second, "--dry-run")
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert line.startswith(f"train: error: command line: {first}") and second in line
    assert line.endswith(f"both set {path}, to different values; keep one")


def test_alias_and_canonical_key_that_agree_are_accepted(byte_corpus, tmp_path) -> None:
    config = write_config(tmp_path, tiny_config(byte_corpus, tmp_path))
    result = train(str(config), "n_layer=3", "model.num_layers=3", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "num_layers: 3" in result.output


# 2. non-finite numbers, and non-finite weights never saved -----------------------------------------
@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=inf", "optimizer.lr"), ("optimizer.lr=.inf", "optimizer.lr"), ("optimizer.grad_clip=.inf", "optimizer.grad_clip"),
    ("model.norm.eps=.nan", "model.norm.eps"), ("save_every_minutes=inf", "save_every_minutes"),
    ("preemption_grace_s=inf", "preemption_grace_s"), ("model.positional.theta=.inf", "model.positional.theta"),
])
def test_non_finite_float_is_refused(byte_corpus, tmp_path, override, key) -> None:
    config = write_config(tmp_path, tiny_config(byte_corpus, tmp_path))
    result = train(str(config), override, "--dry-run")
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert line.startswith(f"train: error: command line override {override}: {key}: Input should be a finite number")


def test_non_finite_weights_are_never_saved_as_good(byte_corpus, tmp_path) -> None:
    """A start checkpoint holding NaN: every loss is NaN, the run stops after max_bad_steps, and the
    stop's checkpoint (step0000000) is not written with those weights."""
    first = tmp_path / "first"
    assert train(str(config_in(first, tiny_config(byte_corpus, first, num_steps=1, eval_every=100)))).exit_code == 0
    weights_path = first / "ckpt" / "final.safetensors"
    weights = load_file(weights_path)
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as fh:
        meta = fh.metadata()
    weights["embed_tokens.weight"][0, 0] = float("nan")
    save_file(weights, weights_path, metadata=meta)
    run = tmp_path / "run"
    cfg = tiny_config(byte_corpus, run, num_steps=10, eval_every=100, max_bad_steps=2, init_from=str(first / "ckpt" / "final"))
    result = train(str(config_in(run, cfg)))
    assert result.exit_code == 3  # diverged
    assert "the weights hold NaN or inf; step0000000 not written, no earlier checkpoint exists" in result.output
    assert "the weights themselves are no longer finite, so none were saved" in result.output
    assert "last good weights saved" not in result.output
    assert not list((run / "ckpt").glob("*.safetensors"))


def test_a_refused_save_keeps_the_previous_checkpoint(byte_corpus, tmp_path) -> None:
    from training.checkpointer import Checkpointer
    from training.config import validate_config
    from training.distributed import setup
    from training.optim import build_optimizer
    from training.parallelize import build_model

    cfg = validate_config(tiny_config(byte_corpus, tmp_path))
    dist = setup(cfg.distributed, "cpu")
    _, net = build_model(cfg, dist, None)
    optimizer = build_optimizer(net, cfg.optimizer, "cpu")
    warnings: list[str] = []
    saver = Checkpointer(tmp_path / "ckpt", dist, cfg.to_plain(), 3, cfg.model.tie_embeddings, warnings.append)
    state = {"scheduler": {}, "scaler": {}, "loader": {}, "tokens_seen": 0, "best_val_loss": 1.0, "world_size": 1}
    assert saver.save(["step0000001"], 1, net, optimizer, state, {}, block=True)
    good = (tmp_path / "ckpt" / "step0000001.safetensors").read_bytes()
    with torch.no_grad():
        next(net.parameters())[0] = float("inf")
    assert not saver.save(["best", "step0000002"], 2, net, optimizer, state, {}, block=True)
    saver.wait()
    assert warnings == [f"step 2: the weights hold NaN or inf; best, step0000002 not written, the newest checkpoint "
                        f"{tmp_path / 'ckpt' / 'step0000001'} is kept"]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors")) == ["latest.safetensors", "step0000001.safetensors"]
    assert os.path.samefile(tmp_path / "ckpt" / "latest.safetensors", tmp_path / "ckpt" / "step0000001.safetensors")
    assert (tmp_path / "ckpt" / "step0000001.safetensors").read_bytes() == good


# 6. an id past the vocabulary in a shard the run never reaches -------------------------------------
def four_shards(tmp_path: Path, bad: Callable[[list[int]], int]) -> tuple[Path, Path, int]:
    """Four byte-level shards under ``data``; the one at index ``bad(epoch 0's visiting order)`` gets
    id 300 three tokens before its end. Returns the folder, that shard and the id's position."""
    from training.data import TokenStream

    docs = stdlib_documents(400_000)
    data = tmp_path / "data"
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(docs)), 4)):
        paths.append(data / f"shard_{i:05d}.tok")
        write_token_shard(paths[-1], byte_tokens([docs[j] for j in chunk]), BYTE_VOCAB, BYTE_EOT)
    path = paths[bad([int(i) for i in TokenStream(sorted(paths), 42, BYTE_VOCAB).order(0)])]
    tokens = np.fromfile(path, dtype=np.uint16, offset=64)
    tokens[-3] = 300
    path.write_bytes(TokenShardHeader(len(tokens), BYTE_VOCAB, BYTE_EOT, 2).pack() + tokens.tobytes())
    return data, path, len(tokens) - 3


def test_bad_id_in_a_shard_not_yet_reached_fails_the_run(tmp_path) -> None:
    """Four shards; the one epoch 0 visits last holds an id past the vocabulary. A 2-step run reads
    only the first: the background scan still stops it, naming the file and the id, exit 2."""
    data, last, at = four_shards(tmp_path, lambda order: order[-1])
    cfg = tiny_config({"train": data, "val": data}, tmp_path, num_steps=2, eval_every=100, seed=42)
    del cfg["val_data"]
    result = train(str(write_config(tmp_path, cfg)))
    assert result.exit_code == 2
    assert one_line(result.stderr) == f"train: error: {last}: token id 300 at position {at} >= model.vocab_size 257"
    assert "step 1/2" in result.output or "step 2/2" in result.output  # it trained while the scan ran
    assert not (tmp_path / "ckpt" / "final.safetensors").exists()


def test_the_scan_deals_the_shards_out_over_the_ranks(tmp_path) -> None:
    """Rank r of w scans every w-th shard, so a node's ranks do not each read the whole corpus; what
    it clears is marked in the stream, and only an agreed all-clear marks the rest."""
    from training.data import TokenStream
    from training.id_scan import IdScan

    data, bad, at = four_shards(tmp_path, lambda order: 0)
    parts = {}
    for rank in (0, 1):
        stream = TokenStream(sorted(data.glob("*.tok")), 42, BYTE_VOCAB)
        scan = IdScan([stream], rank, 2)
        scan.wait()
        parts[rank] = (sorted(stream.checked), scan.clean, scan.found)
        if rank == 1:
            scan.cleared_everywhere()
            assert sorted(stream.checked) == [0, 1, 2, 3]
    assert parts[1] == ([1, 3], True, None)  # shard 0 is not rank 1's to read
    assert parts[0] == ([], False, f"{bad}: token id 300 at position {at} >= model.vocab_size 257")



@pytest.mark.slow  # a 2-rank launch
def test_a_bad_id_in_another_ranks_part_stops_every_rank_on_one_line(tmp_path, capfd) -> None:
    """The bad shard is dealt to rank 1's scan and not read by the 2-step run: both ranks stop at the
    same step, rank 0 prints the line once (no "rank 1:" prefix: every rank raises it), exit 2."""
    from rich.console import Console

    from orchestrator.launch import launch_training

    data, bad, at = four_shards(tmp_path, lambda order: [i for i in order[1:] if i % 2 == 1][-1])
    cfg = tiny_config({"train": data, "val": data}, tmp_path, num_steps=2, eval_every=100, seed=42, batch_size=4)
    del cfg["val_data"]
    cfg["distributed"] = {"strategy": "ddp", "timeout_s": 60}
    code = launch_training(write_config(tmp_path, cfg), 2, Console(file=open(os.devnull, "w")))
    assert code == 2
    assert one_line(capfd.readouterr().err) == f"train: error: {bad}: token id 300 at position {at} >= model.vocab_size 257"
    assert not (tmp_path / "ckpt" / "final.safetensors").exists()

# 14. init_from a hub id that is not cached, offline --------------------------------------------------
def test_init_from_an_uncached_hub_id_offline_is_one_line(byte_corpus, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_config(byte_corpus, tmp_path, init_from="nosuch-owner/nosuch-model")
    proc = subprocess.run([sys.executable, "-m", "training", str(write_config(tmp_path, cfg)), "--dry-run"],
                          env={**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == ("train: error: init_from nosuch-owner/nosuch-model: not a local checkpoint or folder, and not "
                                     "fetched from the Hugging Face hub (not in the local Hugging Face cache, and "
                                     "HF_HUB_OFFLINE=1 keeps the hub from being asked)")


# 18. eval_every set without val_data -----------------------------------------------------------------
def test_eval_every_without_val_data_warns_once_at_start(byte_corpus, tmp_path) -> None:
    cfg = tiny_config(byte_corpus, tmp_path, num_steps=2, eval_every=1)
    del cfg["val_data"]
    result = train(str(write_config(tmp_path, cfg)))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: val_data: not set, so eval_every=1 evaluates nothing: no validation loss, no best "
                        "checkpoint (point val_data at held-out token shards)"]
    assert result.output.index(warnings[0]) < result.output.index("step 1/2")


# 7. torchrun with one rank's data missing --------------------------------------------------------------
DRIVER = """\
import os, sys
from training.cli import main
sys.argv = ["train", sys.argv[1] if os.environ["RANK"] == "0" else sys.argv[2]]
main()
"""


@pytest.mark.slow
def test_one_ranks_missing_data_is_one_line_from_that_rank(byte_corpus, tmp_path) -> None:
    """Rank 1's train_data is missing (a node without the volume): rank 1 says so once; rank 0 does
    not die in its next collective with a gloo traceback. Through orchestrate's filter of torchrun's
    own report (orchestrator/torchrun_output.py) that is the whole of stderr, and the exit code is 2."""
    from orchestrator.torchrun_output import TorchrunFilter

    good = config_in(tmp_path / "r0", tiny_config(byte_corpus, tmp_path / "r0", num_steps=3))
    missing = tmp_path / "nowhere"
    bad = config_in(tmp_path / "r1", tiny_config(byte_corpus, tmp_path / "r1", num_steps=3, train_data=str(missing)))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver), str(good), str(bad)]
    proc = subprocess.run(cmd, env={**ENV, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    expected = f"train: error: rank 1: train_data: {missing} does not exist"
    assert [line for line in proc.stderr.splitlines() if line.startswith("train: error")] == [expected], proc.stderr
    kept: list[str] = []
    filt = TorchrunFilter(kept.append)
    for line in proc.stderr.splitlines(keepends=True):
        filt.feed(line)
    filt.flush()
    assert one_line("".join(kept)) == expected
    assert filt.exit_code == 2
    assert not (tmp_path / "r0" / "ckpt" / "final.safetensors").exists()


def test_rank_agreement_in_one_process_raises_the_error_itself() -> None:
    from training.distributed import Dist

    one = Dist(0, 0, 1, "none", torch.device("cpu"))
    assert one.agree(lambda: 5) == 5
    with pytest.raises(ValueError, match="^boom$"):
        one.agree(lambda: (_ for _ in ()).throw(ValueError("boom")))


# 8. the printed train command is shell-quoted: pasted into a shell, it runs the same command ------------
@pytest.mark.slow  # two trainer processes (a torch import each): ~10 s on a free machine, more on a shared one
def test_printed_train_command_runs_when_pasted(tmp_path) -> None:
    from rich.console import Console

    from orchestrator.launch import launch_training

    config = tmp_path / "my runs" / "training.yaml"  # a space in the path, as in "My Drive"
    printed = io.StringIO()
    assert launch_training(config, 1, Console(file=printed, width=500)) == 2
    line = printed.getvalue().strip()
    assert line.startswith("[stage] train: ")
    pasted = subprocess.run(["sh", "-c", line.removeprefix("[stage] train: ")], env=ENV, capture_output=True, text=True, timeout=120)
    assert pasted.returncode == 2
    assert one_line(pasted.stderr) == f"train: error: {config}: config file not found"
