"""The compiled FlexAttention kernel on CUDA against the dense-mask SDPA reference (marker ``gpu``)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from training.config import ModelConfig
from training.model import Transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

T = 1024


def _packed(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = [[100, 300, 200, 424], [64] * 16]
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]).to(device)
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (2, T), generator=g).to(device), torch.randint(0, 256, (2, T), generator=g).to(device), doc_ids)


def test_compiled_flex_equals_dense_forward_and_backward() -> None:
    torch.manual_seed(0)
    nets = {impl: Transformer(ModelConfig(vocab_size=256, d_model=256, num_layers=2, max_seq_len=T,
                                          attention={"n_heads": 4, "n_kv_heads": 2, "impl": impl})).cuda()
            for impl in ("flex", "sdpa")}
    nets["sdpa"].load_state_dict(nets["flex"].state_dict())
    x, y, doc_ids = _packed("cuda")
    losses, kernels = {}, {}
    for impl, net in nets.items():
        net(x, y, doc_ids=doc_ids)[1].backward()  # warm-up: compile
        net.zero_grad()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            losses[impl] = net(x, y, doc_ids=doc_ids)[1]
            losses[impl].backward()
        kernels[impl] = {e.key for e in prof.key_averages()}
    torch.testing.assert_close(losses["flex"], losses["sdpa"], atol=2e-4, rtol=1e-3)
    for (name, p), q in zip(nets["flex"].named_parameters(), nets["sdpa"].parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
    assert any("flex" in k.lower() or "triton_tem" in k for k in kernels["flex"]), sorted(kernels["flex"])
    assert not any("efficient_attention" in k or "fmha" in k for k in kernels["flex"]), sorted(kernels["flex"])
