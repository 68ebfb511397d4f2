"""Which arithmetic a run uses, decided once from the config and the device.

bf16 autocast on CUDA; float16 with a GradScaler where the GPU has no bf16; float32 on the CPU
unless ``dtype`` is set explicitly in the config (CPU bf16 autocast is slower than float32 on most
CPUs, and the exact-resume guarantee is stated for float32). Under FSDP the policy's
``param_dtype`` does the casting, so autocast is off there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    device_type: str
    compute_dtype: torch.dtype
    autocast_enabled: bool
    use_scaler: bool
    reason: str

    def autocast(self) -> ContextManager[None]:
        if not self.autocast_enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute_dtype)

    @property
    def fsdp_param_dtype(self) -> torch.dtype | None:
        return None if self.compute_dtype == torch.float32 else self.compute_dtype


def resolve_precision(dtype: str, explicit: bool, device: torch.device, fsdp: bool) -> Precision:
    want = _DTYPES[dtype]
    reason = f"dtype {dtype}"
    if device.type == "cpu" and not explicit:
        want, reason = torch.float32, "float32 on CPU (set dtype explicitly for CPU autocast)"
    elif device.type == "cuda" and want == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        # Emulated bf16 (V100, T4: is_bf16_supported() says True by default) runs at a fraction of fp16's speed.
        want, reason = torch.float16, "float16 + GradScaler (this GPU has no bfloat16)"
    scaler = want == torch.float16
    autocast = want != torch.float32 and not fsdp
    if fsdp and want != torch.float32:
        reason += " via FSDP mixed precision (float32 master weights and reductions)"
    return Precision(device.type, want, autocast, scaler, reason)
