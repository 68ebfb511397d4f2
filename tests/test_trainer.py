"""The trainer end to end on a CPU: learning, exact resume, checkpoints, stops and the CLI."""

from __future__ import annotations

import json
import math
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config, wait_for_metric_lines
from training import checkpoint as ckpt
from training.config import validate_config
from training.model import Transformer
from training.trainer import EXIT_NONFINITE, train


def run(corpus, out, resume=None, **overrides):
    return train(validate_config(tiny_config(corpus, out, **overrides)), resume=resume)


def test_200_steps_on_real_text_bring_validation_loss_well_down(byte_corpus, tmp_path) -> None:
    result = run(byte_corpus, tmp_path, num_steps=200, eval_every=50, log_every=50, save_every=100)
    assert result.exit_code == 0
    assert result.val_losses[200] < result.val_losses[100] < result.val_losses[50]
    assert result.val_losses[0] > 0.9 * math.log(257)  # measured before the first step: about ln(257)
    assert result.val_losses[200] < 0.65 * result.val_losses[0]


def test_exact_resume_gives_the_same_loss_at_every_step(byte_corpus, tmp_path) -> None:
    extra = dict(num_steps=16, save_every=8, eval_every=8, num_workers=2, gradient_accumulation_steps=2,
                 model__dropout=0.1, keep_last_n=5, scheduler__total_steps=16)
    straight = run(byte_corpus, tmp_path / "a", **extra)
    first = run(byte_corpus, tmp_path / "b", **{**extra, "num_steps": 8})
    second = run(byte_corpus, tmp_path / "b", resume="auto", **extra)
    assert sorted(first.losses) == list(range(1, 9)) and sorted(second.losses) == list(range(9, 17))
    resumed = {**first.losses, **second.losses}
    assert resumed == straight.losses  # bit for bit in float32 on the CPU
    assert second.val_losses[16] == straight.val_losses[16]


def test_checkpoint_files_and_retention(byte_corpus, tmp_path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(byte_corpus, tmp_path, num_steps=50, save_every=10, keep_last_n=2)))
    result = train(validate_config(yaml.safe_load(config_file.read_text())), config_path=config_file)
    d = Path(result.checkpoint_dir)
    tags = {p.name.split(".")[0] for p in d.glob("*.safetensors")}
    assert tags == {"step0000030", "step0000040", "best", "final", "latest"}
    for tag in tags:
        assert {f"{tag}{s}" for s in ckpt.SUFFIXES} <= {p.name for p in d.iterdir()}
    assert (d / "run.yaml").read_text() == config_file.read_text()
    saved = json.loads((d / "final.config.json").read_text())
    assert saved["model"]["d_model"] == 64 and saved["num_steps"] == 50
    state = torch.load(d / "final.state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "loader", "rng", "step", "tokens_seen"} <= set(state)
    assert state["step"] == 50 and state["tokens_seen"] == 50 * 8 * 64
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    model = Transformer(validate_config(saved).model)
    weights = load_file(d / "final.safetensors")
    model.load_state_dict(weights, strict=False)  # tied head: stored once, as embed_tokens
    assert "lm_head.weight" not in weights
    assert not list(d.glob(".tmp-*"))
    steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps[:4] == [0, 1, 2, 3]  # the untrained validation loss, then every log step


def test_resume_auto_starts_fresh_without_checkpoints_and_skips_a_broken_newest(byte_corpus, tmp_path, capsys) -> None:
    assert run(byte_corpus, tmp_path, resume="auto", num_steps=20).step == 20
    d = tmp_path / "ckpt"
    (d / "final.safetensors").write_bytes(b"\0" * 100)  # the newest tag is now corrupt
    for gone in ("step0000020.safetensors", "best.safetensors"):
        (d / gone).unlink(missing_ok=True)
    later = run(byte_corpus, tmp_path, resume="auto", num_steps=25)
    out = capsys.readouterr().out
    assert "skipping broken checkpoint" in out and "final.safetensors" in out
    assert "resumed from" in out and "step0000010" in out
    assert min(later.losses) == 11 and later.step == 25


def test_state_and_weights_from_different_saves_are_refused(byte_corpus, tmp_path) -> None:
    run(byte_corpus, tmp_path, num_steps=20)
    d = tmp_path / "ckpt"
    (d / "step0000010.state.pt").write_bytes((d / "final.state.pt").read_bytes())
    with pytest.raises(ckpt.CheckpointError, match="disagree"):
        ckpt.load_tag(d, "step0000010")


def test_non_finite_losses_stop_the_run_with_a_checkpoint(byte_corpus, tmp_path, capsys) -> None:
    result = run(byte_corpus, tmp_path, num_steps=50, optimizer__lr=1e12, optimizer__grad_clip=0.0,
                 scheduler__warmup_steps=0, max_bad_steps=3, eval_every=1000, save_every=1000)
    out = capsys.readouterr().out
    assert result.exit_code == EXIT_NONFINITE
    assert out.count("non-finite loss at step") == 3 and "last good weights saved" in out
    loaded = ckpt.load_tag(tmp_path / "ckpt", ckpt.step_tag(result.step))
    assert all(torch.isfinite(t).all() for t in loaded.weights.values())


def _spawn_cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training", *args], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_saves_and_exits_143_then_resume_continues(byte_corpus, tmp_path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(byte_corpus, tmp_path, num_steps=100000, save_every=100000, eval_every=100000)))
    proc = _spawn_cli([str(cfg_path)], tmp_path)
    metrics = tmp_path / "ckpt" / "metrics.jsonl"
    wait_for_metric_lines(metrics, 6, 60)
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert "stopped by signal" in out
    (_, tag), *_ = ckpt.list_tags(tmp_path / "ckpt")
    step = ckpt.load_tag(tmp_path / "ckpt", tag).step
    resumed = subprocess.run([sys.executable, "-m", "training", str(cfg_path), f"num_steps={step + 3}", "--resume", "auto"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'ckpt' / tag} at step {step}" in resumed.stdout


def test_no_config_without_terminal_is_a_clear_error(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "training"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no config given and no terminal" in proc.stderr


def test_preset_menu_on_a_terminal(tmp_path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a real pseudo-terminal
        os.execv(sys.executable, [sys.executable, "-m", "training", "--dry-run"])
    output = b""
    deadline = time.time() + 60
    answered = False
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        if not answered and b"preset [1-" in output:
            menu = output.decode()
            number = next(line.split(".")[0].strip() for line in menu.splitlines() if "runpod_2b" in line)
            os.write(fd, f"{number}\n".encode())
            answered = True
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert "1.97B parameters (2560 x 24 layers" in text  # the menu shows descriptions
    assert "parameters: 1,973,414,400" in text and os.waitstatus_to_exitcode(status) == 0


def test_wall_clock_checkpoints(byte_corpus, tmp_path) -> None:
    run(byte_corpus, tmp_path, num_steps=6, save_every=1000, eval_every=1000, save_every_minutes=1e-6, keep_last_n=10)
    assert {p.name for p in (tmp_path / "ckpt").glob("step*.safetensors")} == {f"step{s:07d}.safetensors" for s in range(1, 6)}


def _can_mount_private_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_private_tmpfs(), reason="needs unshare and tmpfs mounts (user namespaces)")
def test_disk_full_while_saving_is_a_clear_error_and_keeps_earlier_checkpoints(byte_corpus, tmp_path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    cfg = tiny_config(byte_corpus, tmp_path, num_steps=40, save_every=10, eval_every=1000, keep_last_n=5)
    cfg["checkpoint_dir"] = str(volume / "ckpt")
    cfg["tensorboard_dir"] = str(tmp_path / "tb")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    # A private 2.5 MB filesystem: one checkpoint (~1.6 MB) fits, the second does not.
    shell = (f"mount -t tmpfs -o size=2500k tmpfs {volume} && {sys.executable} -m training {tmp_path / 'c.yaml'}; rc=$?; "
             f"{sys.executable} -c \"from training.checkpoint import load_tag; print('intact', load_tag('{volume / 'ckpt'}', 'step0000010').step)\"; "
             f"ls -a {volume / 'ckpt'}; exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", shell], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("train: error: ") and "could not write checkpoint step0000020" in error
    assert "No space left on device" in error and "earlier checkpoints are untouched" in error
    assert "intact 10" in proc.stdout and ".tmp-" not in proc.stdout
