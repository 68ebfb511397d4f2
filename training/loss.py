"""The language-model loss: mean cross-entropy of ``hidden @ weight.T`` without the full logits.

``F.cross_entropy(lm_head(h).float(), y)`` keeps the (tokens, vocab) logits alive through the
backward pass, in bf16 and again in float32 for the log-softmax: at 8 x 2048 tokens and a
32,000 vocabulary that is 3.1 GB per micro-batch, more than a whole transformer block saves. Here
the rows are processed in chunks and each chunk's gradient is computed as soon as its loss is
(the loss is a scalar at the end of the graph, so its incoming gradient is known up to a scale),
which is what liger-kernel's fused linear cross-entropy does on CUDA. Saved for backward: the
gradient of ``hidden`` (its own size) and of ``weight`` (float32); the logits of one chunk exist
at a time and are never saved.

On CUDA, ``loss_kernel: liger`` (with ``liger-kernel`` installed: the ``cuda`` extra) runs its
Triton kernel instead, with float32 accumulation of the weight gradient (``accum_dtype``; liger's
default accumulates it in bf16 across chunks). It is not the default: liger reads its count of
valid targets with ``.item()`` in every call, a host synchronisation per micro-step and a graph
break in the compiled loss, where the chunked path keeps everything on the device. The CPU path
is always the chunked one. Rows whose target is ``ignore_index`` (-100, as in
``F.cross_entropy``) count neither in the loss nor in the mean, so masked fine-tuning targets
work. A batch with every target ignored gives NaN, like ``F.cross_entropy``.
"""

from __future__ import annotations

import contextlib
import math

import torch

IGNORE_INDEX = -100

try:  # optional: Triton kernels for CUDA (pip install 'podtrain[cuda]')
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as _liger
except Exception:  # not installed, or no Triton on this platform
    _liger = None


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on (what ``lm_head(h)`` would
    use), else the inputs' own (FSDP's bf16 parameters, or float32)."""
    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """The loss picks its dtypes itself (the meta device, used by the memory plan, has no autocast)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


MIN_CHUNK_ROWS = 1024


def default_chunk_rows(rows: int, vocab: int, dim: int) -> int:
    """Rows per chunk such that one chunk's logits are about the size of ``hidden`` (liger-kernel's
    rule: the transient stays below what the activations already cost), but at least 1024 rows:
    every chunk adds its (V, d) weight gradient, and thinner chunks make that GEMM memory-bound
    (63 chunks of 33 rows ran 2x slower than the plain loss on a CPU; 1024 rows of a 32k
    vocabulary is a 131 MB float32 transient)."""
    return max(1, min(rows, max(MIN_CHUNK_ROWS, math.ceil(rows / math.ceil(vocab / dim)))))


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int, ignore_index: int,
             dtype: torch.dtype, grad_hidden: bool, grad_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss and, when asked, the gradients of mean loss w.r.t. hidden and weight."""
    h, w = hidden.to(dtype), weight.to(dtype)
    valid = targets != ignore_index
    count = valid.sum()
    safe = targets.masked_fill(~valid, 0)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    gh = torch.empty_like(h) if grad_hidden else None
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grad_weight else None
    for start in range(0, h.shape[0], chunk_rows):
        end = min(start + chunk_rows, h.shape[0])
        hc, tc, vc = h[start:end], safe[start:end, None], valid[start:end]
        logits = (hc @ w.T).float()
        lse = torch.logsumexp(logits, dim=-1)
        loss_sum += ((lse - logits.gather(1, tc).squeeze(1)) * vc).sum()
        if gh is None and gw is None:
            continue
        grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        grad.scatter_add_(1, tc, torch.full_like(tc, -1, dtype=grad.dtype))
        grad.mul_((vc / count).to(grad.dtype)[:, None])  # 1/n for counted rows, 0 for ignored ones
        grad = grad.to(dtype)
        if gh is not None:
            gh[start:end] = grad @ w
        if gw is not None:
            if dtype == torch.float32:
                gw.addmm_(grad.T, hc)  # accumulate inside the GEMM: no extra pass over (V, d) per chunk
            else:
                gw.add_(grad.T @ hc)  # in-place add upcasts without a float32 copy of the chunk's gradient
    return loss_sum / count, gh, gw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
        with _autocast_off(hidden.device.type):
            loss, gh, gw = _chunked(hidden, weight, targets, chunk_rows, ignore_index, dtype,
                                    ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.save_for_backward(gh, gw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        gh, gw = ctx.saved_tensors
        grad_hidden = (gh * grad_loss).to(ctx.hidden_dtype) if gh is not None else None
        grad_weight = (gw * grad_loss).to(ctx.weight_dtype) if gw is not None else None
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None,
                         use_liger: bool = False) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (N, d) @ weight (V, d).T`` against ``targets (N,)``, float32.

    Equal to ``F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index)``
    (and so are the gradients) without materialising the (N, V) logits for backward.
    """
    dtype = compute_dtype(hidden, weight)
    rows = chunk_rows or default_chunk_rows(hidden.shape[0], weight.shape[0], weight.shape[1])
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):  # evaluation: no gradients to make
        with _autocast_off(hidden.device.type):
            return _chunked(hidden, weight, targets, rows, ignore_index, dtype, False, False)[0]
    if use_liger and _liger is not None and hidden.is_cuda:
        with _autocast_off("cuda"):
            out = _liger(hidden.to(dtype), weight.to(dtype), targets, ignore_index=ignore_index, reduction="mean",
                         accum_dtype=torch.float32)
        return (out[0] if isinstance(out, tuple) else out).float()
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows, ignore_index, dtype)
