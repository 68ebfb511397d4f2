"""Launching the trainer from the orchestrator: the command, signal forwarding, torchrun's output.

The pretraining stage (``orchestrator.pipeline``) and the SFT stages (``orchestrator.sft.stages``)
launch ``train`` the same way, so this module sits below both of them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator.torchrun_output import filter_stream
from training.config import TrainConfig


class PipelineError(ValueError):
    """A user error in the pipeline's inputs; one line (or a short listing) naming what is wrong."""


def training_summary(cfg: TrainConfig) -> dict[str, Any]:
    """A finished training stage's summary: its checkpoints and last logged throughput."""
    path = Path(cfg.checkpoint_dir) / "metrics.jsonl"
    metrics = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    tps = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    return {"result": str(cfg.checkpoint_dir), "throughput": f"{tps[-1]:,.0f} tokens/s" if tps else ""}


class TrainingExit(RuntimeError):
    """The trainer exited non-zero; its code is passed on (143 after SIGTERM, 3 on divergence)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"the trainer exited with code {exit_code}")
        self.exit_code = exit_code


def training_command(config: Path, nproc: int) -> list[str]:
    """``python -m training CONFIG --resume auto``, through torchrun for more than one process."""
    train = ["-m", "training", str(config), "--resume", "auto"]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *train]
    return [sys.executable, *train]


def launch_training(config: Path, nproc: int | None, console: Console) -> int:
    """Run the trainer as a child and forward SIGTERM/SIGINT to it once, so it can checkpoint and exit.

    Through torchrun, its failure report is dropped from stderr and the failed rank's own exit code
    returned (``orchestrator.torchrun_output``), so a bad shard reads as one line and exits 2.
    """
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count()
    cmd = training_command(config, nproc)
    console.print(f"[stage] train: {shlex.join(cmd)}", markup=False)  # quoted: pasted into a shell, it runs as is
    piped = nproc > 1
    env = dict(os.environ)
    if piped:  # torchrun would set 1 (with a banner); the cores shared out is what CPU ranks can use
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # its own group: a Ctrl-C reaches it once, from us
    child = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE if piped else None, text=piped, env=env)

    def forward(signum: int, frame: Any) -> None:
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rank_code = filter_stream(child.stderr, _to_stderr) if piped else None
        code = child.wait()
        return rank_code if code != 0 and rank_code is not None else code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _to_stderr(line: str) -> None:
    sys.stderr.write(line)
    sys.stderr.flush()
