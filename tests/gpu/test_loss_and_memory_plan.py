"""CUDA checks of the chunked/fused loss and of the memory plan (marker ``gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training import loss as loss_module
from training.config import validate_config
from training.memory_plan import plan
from training.token_shards import write_token_shard
from training.trainer import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_loss_and_gradients_match_plain_cross_entropy_on_cuda_in_float32() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1000, 256, device="cuda", generator=g)
    weight = torch.randn(4099, 256, device="cuda", generator=g) * 0.05
    targets = torch.randint(0, 4099, (1000,), device="cuda", generator=g)
    targets[::7] = -100
    results = []
    for fn in (lambda h, w: F.cross_entropy((h @ w.T).float(), targets, ignore_index=-100),
               lambda h, w: loss_module.linear_cross_entropy(h, w, targets)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for ref, got in zip(results[0], results[1]):
        assert torch.allclose(got, ref, atol=1e-5, rtol=0)


# liger splits these rows into vocab/dim = 64 chunks of 256 (the chunked loss into 16 of 1,024). The
# weight gradient's error relative to its largest entry, simulated on a CPU for these shapes: 0.46%
# for the chunked loss under bf16 autocast (float32 accumulation), 2.3% with bf16 accumulation over
# 64 chunks (liger without accum_dtype): the tolerance sits between them, 2x from each.
ROWS, DIM, VOCAB, WEIGHT_GRAD_TOL = 16384, 128, 8191, 1e-2


def _bf16_case():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(ROWS, DIM, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(VOCAB, DIM, device="cuda", generator=g) * 0.05).bfloat16()
    targets = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=g)
    targets[::7] = -100
    return hidden, weight, targets


def _grads(fn, hidden, weight):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach().float(), h.grad.float(), w.grad.float()


def _weight_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("kernel", ["chunked", pytest.param("liger", marks=pytest.mark.skipif(
    loss_module._liger is None, reason="liger-kernel not installed (the cuda extra)"))])
def test_bf16_loss_kernels_accumulate_the_weight_gradient_in_float32(kernel) -> None:
    """Against the project's float32 chunked loss on the same bf16 values; the bf16-accumulating liger
    call (accum_dtype None) is shown to fail the same tolerance."""
    hidden, weight, targets = _bf16_case()
    ref = _grads(lambda h, w: loss_module.linear_cross_entropy(h.float(), w.float(), targets), hidden, weight)
    if kernel == "chunked":
        def fn(h, w):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return loss_module.linear_cross_entropy(h.float(), w.float(), targets)
    else:
        def fn(h, w):
            return loss_module.linear_cross_entropy(h, w, targets, use_liger=True)
    loss, grad_h, grad_w = _grads(fn, hidden, weight)
    assert abs(float(loss - ref[0])) <= 1e-3 * float(ref[0])
    assert _weight_error(grad_h, ref[1]) <= WEIGHT_GRAD_TOL
    assert _weight_error(grad_w, ref[2]) <= WEIGHT_GRAD_TOL
    if kernel == "liger":
        bf16_accum = _grads(lambda h, w: loss_module._liger(h, w, targets, ignore_index=-100, reduction="mean"), hidden, weight)
        assert _weight_error(bf16_accum[2], ref[2]) > WEIGHT_GRAD_TOL  # the tolerance sees bf16 accumulation


def test_bf16_peak_memory_is_within_ten_percent_of_the_plan(tmp_path) -> None:
    vocab = 32000
    data = tmp_path / "train" / "shard_00000.tok"
    write_token_shard(data, np.random.default_rng(0).integers(0, vocab - 1, 200_000), vocab, vocab - 1)
    cfg = validate_config({"train_data": str(data.parent), "device": "cuda", "dtype": "bfloat16", "seq_len": 1024,
                           "batch_size": 8, "num_steps": 2, "log_every": 1, "eval_every": 10**9, "save_every": 10**9,
                           "num_workers": 0, "checkpoint_dir": str(tmp_path / "ckpt"),
                           "model": {"vocab_size": vocab, "d_model": 1024, "num_layers": 4, "max_seq_len": 1024,
                                     "attention": {"n_heads": 16}}})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train(cfg)
    measured, planned = torch.cuda.max_memory_allocated(), plan(cfg).peak_bytes
    assert abs(measured - planned) <= 0.10 * planned, f"measured {measured / 1e9:.2f} GB, planned {planned / 1e9:.2f} GB"


def test_cuda_rms_norm_saves_what_the_plan_counts() -> None:
    """The plan counts RMSNorm as CUDA's fused kernel saves it (training/memory_plan.py): the input and
    a float32 rstd per row, not the composite kernel's float32 copies."""
    norm = torch.nn.RMSNorm(1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 128, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t is not norm.weight:
            saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        norm(x)
    assert sum(t.untyped_storage().nbytes() for t in saved.values()) == 2 * 128 * (1024 * 2 + 4)
