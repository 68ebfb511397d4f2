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


@pytest.mark.parametrize("use_liger", [False, pytest.param(True, marks=pytest.mark.skipif(
    loss_module._liger is None, reason="liger-kernel not installed (pip install 'podtrain[cuda]')"))])
@pytest.mark.parametrize("autocast", [False, True])
def test_loss_and_gradients_match_plain_cross_entropy_on_cuda(use_liger, autocast) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1000, 256, device="cuda", generator=g)
    weight = torch.randn(4099, 256, device="cuda", generator=g) * 0.05
    targets = torch.randint(0, 4099, (1000,), device="cuda", generator=g)
    targets[::7] = -100
    results = []
    for fn in (lambda h, w: F.cross_entropy((h @ w.T).float(), targets, ignore_index=-100),
               lambda h, w: loss_module.linear_cross_entropy(h, w, targets, use_liger=use_liger)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    tol = 2e-2 if autocast else 1e-5  # bf16 matmuls round per chunk
    for ref, got in zip(results[0], results[1]):
        assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=0)


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
