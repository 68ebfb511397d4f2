"""Throughput, MFU, system telemetry and the run log (console, TensorBoard, optional Weights & Biases).

MFU is model FLOPs per second over the device's dense bf16 peak, from a table of known GPUs;
on an unknown device (a CPU, a new card) MFU is not shown rather than guessed.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console

from training.atomic import atomic_write_text

# Dense (no sparsity) bf16 tensor-core peaks with float32 accumulation, FLOP/s, by a substring of
# torch.cuda.get_device_name() (NVIDIA's datasheets). The first match wins: a name that contains
# another ("H100 NVL" contains "H100", "GH200" contains "H200", "A100" contains "A10") comes first;
# a test checks the order. The NVL parts run at a lower clock than the SXM ones.
GPU_PEAK_BF16: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A6000", 155e12),
    ("A40", 150e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
]


def peak_flops_for(name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU called ``name``, or None when it is not in the table."""
    for key, peak in GPU_PEAK_BF16:
        if key in name:
            return peak
    return None


def compile_report() -> dict[str, int]:
    """What torch.compile captured so far (dynamo's counters): graphs, graph breaks, frames it gave up on.

    Logged after the first step so a run whose model silently fell back to eager (a graph break in
    every block, or a frame skipped whole) says so in its first lines, not in its MFU a day later.
    """
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "frames_compiled": int(counters["frames"]["ok"]),
        "frames_skipped": int(counters["frames"]["total"] - counters["frames"]["ok"]),
    }


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``, or None when unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device))


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None, world_size: int = 1) -> float | None:
    if not peak:
        return None
    return tokens_per_second * flops_per_token / (peak * world_size)


@functools.cache
def _this_process() -> psutil.Process:
    """One Process object per run: its ``cpu_percent`` measures the time since the previous call."""
    return psutil.Process()


def system_telemetry(device: torch.device) -> dict[str, float]:
    """CPU % of this process since the last call, its RSS, system RAM in use and, on CUDA, the
    caching allocator's allocated and reserved bytes: what tells a data-loader stall, a host
    memory leak or fragmentation apart from a slow step (seed 004's telemetry)."""
    proc = _this_process()
    values = {
        "cpu_percent": proc.cpu_percent(interval=None),
        "rss_gb": proc.memory_info().rss / 1e9,
        "ram_used_gb": psutil.virtual_memory().used / 1e9,
    }
    if device.type == "cuda":
        values["gpu_mem_allocated_gb"] = torch.cuda.memory_allocated(device) / 1e9
        values["gpu_mem_reserved_gb"] = torch.cuda.memory_reserved(device) / 1e9
    return values


def _start_wandb(wandb_cfg: dict[str, Any], warn) -> Any:
    """A W&B run, or None with one warning when W&B cannot start (not logged in, no network): a
    dashboard is not worth a lost training run, and TensorBoard and metrics.jsonl keep every scalar."""
    import wandb  # optional dependency: only needed when use_wandb is true

    try:
        return wandb.init(**wandb_cfg)
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError, wandb.errors.CommError) as exc:
        reason = " ".join(str(exc).split())
        warn(f"use_wandb: W&B did not start ({reason}); continuing without it: scalars go to TensorBoard and "
             f"metrics.jsonl (run `wandb login` or set WANDB_API_KEY, or WANDB_MODE=offline, to log to W&B)")
        return None


class RunLog:
    """Console lines on rank 0, TensorBoard scalars, and W&B when ``use_wandb`` (imported lazily)."""

    def __init__(self, enabled: bool, tensorboard_dir: Path, wandb_cfg: dict[str, Any] | None, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        tensorboard_dir.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(log_dir=str(tensorboard_dir))
        if wandb_cfg is not None:
            self.wandb = _start_wandb(wandb_cfg, self.warn)

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"warning: {message}", style="yellow", markup=False, highlight=False)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if not self.enabled:
            return
        present = {k: v for k, v in values.items() if v is not None}
        if self.tb is not None:
            for key, value in present.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(present, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def trim_metrics(path: Path, step: int) -> int:
    """Drop rows after ``step`` from a metrics.jsonl (a run killed after its last checkpoint logged
    steps that the resumed run will log again); returns how many rows were dropped."""
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a row torn by the kill
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)
