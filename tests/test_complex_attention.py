"""Complex-valued attention (training/complex_attention.py): it computes what docs/training.md says,
against a reference in torch's own complex arithmetic; it is standard attention when every phase is
zero; the KV cache gives the same logits; and a model with it trains (the loss falls)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from training.complex_attention import ComplexAttention
from training.config import ModelConfig, validate_config
from training.model import KVCache, Transformer
from training.trainer import train


def _layer(n_heads: int = 4, n_kv_heads: int | None = None) -> ComplexAttention:
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=1, max_seq_len=32,
                      attention={"type": "complex", "n_heads": n_heads, "n_kv_heads": n_kv_heads})
    return ComplexAttention(cfg)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The rule in complex64: s = q k^H / sqrt(D), w = softmax(Re s) (causal), out = (w * s/|s|) v."""
    half = q.shape[-1] // 2
    qc, kc, vc = (torch.complex(t[..., :half].double(), t[..., half:].double()) for t in (q, k, v))
    s = qc @ kc.conj().transpose(-2, -1) / math.sqrt(q.shape[-1])
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    w = torch.softmax(s.real.masked_fill(~causal, float("-inf")), dim=-1)
    out = (w * s / s.abs()) @ vc
    return torch.cat((out.real, out.imag), dim=-1).float()


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_attend_matches_the_complex_arithmetic_reference(kv_heads: int | None) -> None:
    torch.manual_seed(0)
    layer = _layer(4, kv_heads).eval()
    q = torch.randn(2, 4, 7, 8)
    k, v = torch.randn(2, kv_heads or 4, 7, 8), torch.randn(2, kv_heads or 4, 7, 8)
    expanded = (k.repeat_interleave(4 // (kv_heads or 4), 1), v.repeat_interleave(4 // (kv_heads or 4), 1))
    torch.testing.assert_close(layer.attend(q, k, v, None), _reference(q, *expanded), atol=1e-5, rtol=1e-4)


def test_with_every_phase_zero_it_is_standard_attention() -> None:
    torch.manual_seed(1)
    layer = _layer().eval()
    q, k = torch.randn(1, 4, 6, 8).abs(), torch.randn(1, 4, 6, 8).abs()
    q[..., 4:], k[..., 4:] = 0, 0  # real queries and keys with positive products: s is real and > 0
    v = torch.randn(1, 4, 6, 8)
    standard = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(layer.attend(q, k, v, None), standard, atol=1e-5, rtol=1e-4)
    q[..., 4:] = torch.randn(1, 4, 6, 4)  # a phase: no longer the standard layer
    assert not torch.allclose(layer.attend(q, k, v, None), F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-3)


def test_the_kv_cache_gives_the_logits_of_a_full_forward() -> None:
    torch.manual_seed(2)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, num_layers=2, max_seq_len=32,
                                    attention={"type": "complex", "n_heads": 4, "n_kv_heads": 2})).eval()
    idx = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(2, 32)
        first, _ = model(idx[:, :8], cache=cache)
        rest = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-4, rtol=1e-4)


def test_a_model_with_complex_attention_trains(byte_corpus, tmp_path) -> None:
    cfg = tiny_config(byte_corpus, tmp_path, num_steps=40, eval_every=40, save_every=1000)
    cfg["model"]["attention"] = {"type": "complex", "n_heads": 4}
    result = train(validate_config(cfg))
    assert result.exit_code == 0
    first, last = result.losses[1], sum(result.losses[s] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)  # from ~5.6 (ln 257) well into the byte statistics
    assert result.val_losses[40] < result.val_losses[0] - 1.0
