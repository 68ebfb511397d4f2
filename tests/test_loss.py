"""The chunked linear + cross-entropy equals the plain loss and gradients, and never saves the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.config import ModelConfig
from training.loss import linear_cross_entropy
from training.model import Transformer


def _plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)


def _grads(fn, hidden, weight, targets):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("rows, vocab, dim, chunk_rows, masked", [
    (37, 101, 16, 5, 0.0),     # odd sizes, last chunk short
    (64, 128, 32, 16, 0.3),    # chunk boundaries on multiples, 30% of targets ignored
    (50, 97, 24, 50, 0.5),     # one chunk
    (33, 61, 8, 1, 0.2),       # one row per chunk
    (40, 257, 64, None, 0.1),  # the default chunking
])
def test_loss_and_gradients_match_plain_cross_entropy(rows, vocab, dim, chunk_rows, masked) -> None:
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, dim, generator=g, dtype=torch.float64).float()
    weight = torch.randn(vocab, dim, generator=g) * 0.3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < masked] = -100
    targets[0] = -100  # always one ignored row, at a chunk's start
    ref = _grads(_plain, hidden, weight, targets)
    got = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=chunk_rows), hidden, weight, targets)
    assert torch.allclose(got[0], ref[0], atol=1e-5, rtol=0)
    assert torch.allclose(got[1], ref[1], atol=1e-5, rtol=0)
    assert torch.allclose(got[2], ref[2], atol=1e-5, rtol=0)
    assert got[1][0].abs().max() == 0  # an ignored row gets no gradient


def test_bf16_autocast_matches_plain_under_the_same_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(48, 32, generator=g), torch.randn(200, 32, generator=g) * 0.2
    targets = torch.randint(0, 200, (48,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_plain, hidden, weight, targets)
        got = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=7), hidden, weight, targets)
    assert got[2].dtype == weight.dtype == torch.float32
    # bf16 logits round differently per chunked matmul: agreement at bf16's resolution.
    assert abs(float(got[0]) - float(ref[0])) < 1e-2
    assert torch.allclose(got[1], ref[1], atol=2e-3) and torch.allclose(got[2], ref[2], atol=2e-3)


def test_scaled_loss_scales_the_gradients() -> None:
    """The trainer divides the loss by the accumulation steps: backward must honour the scale."""
    hidden, weight = torch.randn(20, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (20,))
    _, h1, w1 = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=6), hidden, weight, targets)
    _, h4, w4 = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=6) / 4, hidden, weight, targets)
    assert torch.allclose(h4 * 4, h1, atol=1e-6) and torch.allclose(w4 * 4, w1, atol=1e-6)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs (each storage once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_full_logits_are_not_saved_for_backward() -> None:
    rows, vocab, dim = 512, 4096, 32
    hidden = torch.randn(rows, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    logits_bytes = rows * vocab * 4
    plain = _saved_bytes(lambda: _plain(hidden, weight, targets))
    chunked = _saved_bytes(lambda: linear_cross_entropy(hidden, weight, targets))
    assert plain >= logits_bytes  # the plain loss keeps the float32 log-softmax of every row
    assert chunked == (rows * dim + vocab * dim) * 4  # exactly the two gradients, nothing the size of the logits


def test_model_returns_loss_without_logits_and_logits_without_targets() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=2, max_seq_len=32, attention={"n_heads": 4})
    model = Transformer(cfg)
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    targets[:, :5] = -100  # a masked prompt
    logits, loss = model(idx, targets)
    assert logits is None
    full, none = model(idx)
    assert none is None and full.shape == (2, 16, 97)
    ref = F.cross_entropy(full.float().view(-1, 97), targets.view(-1), ignore_index=-100)
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-5


def test_evaluation_under_no_grad_gives_the_same_loss_and_keeps_nothing() -> None:
    hidden, weight = torch.randn(45, 16, requires_grad=True), torch.randn(70, 16, requires_grad=True)
    targets = torch.randint(0, 70, (45,))
    targets[3:9] = -100
    with torch.no_grad():
        saved = _saved_bytes(lambda: linear_cross_entropy(hidden, weight, targets, chunk_rows=8))
        got, ref = linear_cross_entropy(hidden, weight, targets, chunk_rows=8), _plain(hidden, weight, targets)
    assert saved == 0 and got.grad_fn is None
    assert abs(float(got) - float(ref)) < 1e-5
