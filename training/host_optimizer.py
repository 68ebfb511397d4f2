"""AdamW with its state on the host: ``optimizer.cpu_offload`` on one GPU (seed 004's "CPU offloading
for optimizer states").

AdamW keeps two float32 moments per parameter, 8 bytes each parameter: for a 1B model, 8 GB of GPU
memory that is touched once per step. Here they live in host memory. Each step a parameter's
gradient comes to the host, the AdamW update runs there on a float32 copy of the parameter, and the
updated values go back (12 bytes per parameter over the bus each step, against 8 bytes per
parameter of GPU memory freed). The parameters themselves stay the model's (the optimizer's
param_groups hold them), so checkpoints, resume (``get_optimizer_state_dict`` maps state by
parameter identity), the learning-rate schedule and the grad scaler work as with ``torch.optim.AdamW``.
Under FSDP, ``cpu_offload`` is FSDP2's own ``CPUOffloadPolicy`` instead (training/distributed.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

HOST = torch.device("cpu")


class HostAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW``'s update (decoupled weight decay, bias correction), state tensors on the host."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=HOST)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=HOST)
                grad = p.grad.detach().to(HOST, torch.float32)
                value = p.detach().to(HOST, torch.float32, copy=True)
                state["step"] += 1
                step = float(state["step"])
                value.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                value.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))
                p.copy_(value, non_blocking=False)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, which moves state to each parameter's device; then back to the host."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.device != HOST:
                    state[key] = value.to(HOST)


def state_bytes_by_device(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state per device type (what ``cpu_offload`` moves off the GPU)."""
    found: dict[str, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                found[local.device.type] = found.get(local.device.type, 0) + local.numel() * local.element_size()
    return found
