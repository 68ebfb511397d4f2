"""Attention for packed examples: FlexAttention with a document-causal BlockMask against the dense-mask
SDPA reference, and plain causal pretraining that passes SDPA no mask at all (so flash attention runs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
import torch.nn.functional as F

from training import attention as attention_mod
from training import model as model_mod
from training.config import ModelConfig
from training.model import Transformer, attention_impl, document_block_mask

VOCAB, T = 61, 200  # T not a multiple of flex's 128-token tile: the partial last tile is exercised


def _cfg(impl: str, **extra) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=64, num_layers=3, max_seq_len=T,
                       attention={"n_heads": 4, "n_kv_heads": 2, "impl": impl}, **extra)


def _pair(**extra) -> tuple[Transformer, Transformer]:
    """The same weights under ``impl: flex`` and ``impl: sdpa``."""
    torch.manual_seed(0)
    flex = Transformer(_cfg("flex", **extra))
    dense = Transformer(_cfg("sdpa", **extra))
    dense.load_state_dict(flex.state_dict())
    return flex, dense


def _packed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows: several examples of uneven lengths (one crossing a 128 tile), and one example alone."""
    lengths = [[17, 120, 40, 23], [T]]
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (2, T), generator=g)
    y = torch.randint(0, VOCAB, (2, T), generator=g)
    y[0, :10] = -100
    return x, y, doc_ids


def test_flex_forward_equals_dense_reference() -> None:
    flex, dense = _pair()
    x, _, doc_ids = _packed_batch()
    with torch.no_grad():  # torch's public flex_attention runs on CPU without gradients
        a = flex.eval()(x, doc_ids=doc_ids)[0]
        b = dense.eval()(x, doc_ids=doc_ids)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flex_backward_equals_dense_reference(monkeypatch) -> None:
    """Loss and every gradient within 1e-5.

    torch's ``flex_attention`` refuses ``requires_grad`` inputs on CPU (``_validate_device``) because
    its CPU path is unfused, not because the backward is missing: the eager higher-order op has
    the same autograd formula the CUDA kernel is generated from. Lifting that one guard runs torch's
    own code, through our BlockMask and mask_mod; the fused CUDA kernel is checked in tests/gpu.
    """
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *tensors: None)
    flex, dense = _pair()
    x, y, doc_ids = _packed_batch()
    losses = []
    for net in (flex, dense):
        _, loss = net.train()(x, y, doc_ids=doc_ids)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(flex.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_block_mask_is_built_once_per_forward_and_shared_by_layers(monkeypatch) -> None:
    built, seen = [], []
    real_build, real_flex = model_mod.create_block_mask, torch_flex.flex_attention

    def counting_build(*args, **kwargs):
        built.append(1)
        return real_build(*args, **kwargs)

    def recording_flex(q, k, v, block_mask, **kwargs):
        seen.append(block_mask)
        return real_flex(q, k, v, block_mask=block_mask, **kwargs)

    monkeypatch.setattr(model_mod, "create_block_mask", counting_build)
    monkeypatch.setattr(attention_mod, "flex_attention", recording_flex)
    attention_mod._flex.cache_clear()
    try:
        flex, _ = _pair()
        x, _, doc_ids = _packed_batch()
        with torch.no_grad():
            flex.eval()(x, doc_ids=doc_ids)
    finally:
        attention_mod._flex.cache_clear()
    assert len(built) == 1 and len(seen) == 3 and all(m is seen[0] for m in seen)


def test_block_mask_skips_tiles_between_examples() -> None:
    """Tiles wholly outside every example are absent from the BlockMask, so the kernel never computes them."""
    doc_ids = torch.repeat_interleave(torch.arange(4), 128)[None]  # four examples, one 128-token tile each
    mask = document_block_mask(doc_ids)
    dense = mask.to_dense()[0, 0]  # (query tiles, key tiles): 1 where the tile is computed
    assert torch.equal(dense, torch.eye(4, dtype=dense.dtype))


def _sdpa_calls(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append({"attn_mask": attn_mask, "is_causal": is_causal})
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_plain_causal_pretraining_passes_no_mask(monkeypatch) -> None:
    calls = _sdpa_calls(monkeypatch)
    for impl in ("auto", "flex", "sdpa"):
        torch.manual_seed(0)
        net = Transformer(_cfg(impl))
        x, y, _ = _packed_batch()
        net(x, y)[1].backward()
    assert len(calls) == 9 and all(c["attn_mask"] is None and c["is_causal"] for c in calls)


def test_packed_batches_take_the_configured_path(monkeypatch) -> None:
    calls = _sdpa_calls(monkeypatch)
    flex, dense = _pair()
    x, _, doc_ids = _packed_batch()
    with torch.no_grad():
        flex.eval()(x, doc_ids=doc_ids)
        assert calls == []  # flex: SDPA is not called
        dense.eval()(x, doc_ids=doc_ids)
    assert len(calls) == 3 and all(c["attn_mask"].shape == (2, 1, T, T) and not c["is_causal"] for c in calls)


def test_auto_takes_flex_on_cuda_only_and_never_with_dropout() -> None:
    auto = _cfg("auto")
    assert attention_impl(auto, torch.device("cpu"), training=True) == "sdpa"
    assert attention_impl(auto, torch.device("cuda"), training=True) == "flex"
    assert attention_impl(auto, torch.device("meta"), training=True) == "sdpa"
    assert attention_impl(_cfg("auto", dropout=0.1), torch.device("cuda"), training=True) == "sdpa"
    assert attention_impl(_cfg("auto", dropout=0.1), torch.device("cuda"), training=False) == "flex"
    with pytest.raises(ValueError, match="model.attention.impl: flex has no attention dropout"):
        attention_impl(_cfg("flex", dropout=0.1), torch.device("cuda"), training=True)
