"""Complex-valued attention: seed 003's ``experiment_complex_attn`` (``model.attention.type: complex``).

Rotary embeddings already treat each head of ``D`` reals as ``D/2`` complex numbers (the half-split
layout: ``z = x[:D/2] + i x[D/2:]``, and RoPE multiplies ``z`` by ``e^{i p theta}``). Ordinary
attention then keeps only the real part of the Hermitian product ``q k^H``, which is exactly the
real dot product ``q . k``: the phase of ``q k^H`` (for RoPE, the relative position) is thrown away.

This layer keeps it. With ``s = q k^H / sqrt(D)`` (complex, one per query-key pair):

    w   = softmax(Re s)            over the causal keys: how much each key counts (as usual)
    a   = w * s / |s|              the weight, carrying the unit phase of s
    out = sum_keys a * v           v read as D/2 complex numbers too; out's real and imaginary
                                   halves go back to D reals for o_proj

So each value is rotated in the complex plane by the angle between its key and the query before it
is summed. With every phase zero (all ``s`` real and positive) this is standard attention. The
parameters are the standard layer's (same projections, same count); the cost is explicit (T, S)
score tensors instead of a fused kernel, which suits an experiment at modest ``seq_len``.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from training.attention import Attention

PHASE_EPS = 1e-6  # |s| below this: the phase is taken as 0 (no rotation), not 0/0


class ComplexAttention(Attention):
    """The standard layer's projections and cache; :meth:`attend` is the complex-valued rule above."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None) -> torch.Tensor:
        if isinstance(mask, BlockMask):  # attention_impl never picks flex for this layer
            raise ValueError("attention.type complex computes its scores itself: packed rows need the dense (sdpa) mask")
        if self.n_kv_heads != self.n_heads:  # GQA: each key/value head serves n_heads / n_kv_heads query heads
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        half = q.shape[-1] // 2
        qr, qi, kr, ki, vr, vi = q[..., :half], q[..., half:], k[..., :half], k[..., half:], v[..., :half], v[..., half:]
        scale = 1.0 / math.sqrt(q.shape[-1])
        real = (qr @ kr.transpose(-2, -1) + qi @ ki.transpose(-2, -1)) * scale  # Re(q k^H): q . k
        imag = (qi @ kr.transpose(-2, -1) - qr @ ki.transpose(-2, -1)) * scale  # Im(q k^H)
        T, S = q.shape[2], k.shape[2]
        if mask is None:  # causal; with a cached prefix of S - T keys, query t sees keys up to S - T + t
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        weights = torch.softmax(real.float().masked_fill(~mask, float("-inf")), dim=-1)
        if self.training and self.dropout > 0:
            weights = torch.nn.functional.dropout(weights, self.dropout)
        magnitude = torch.sqrt(real.float() ** 2 + imag.float() ** 2)
        safe = magnitude > PHASE_EPS
        cos = torch.where(safe, real.float() / magnitude.clamp_min(PHASE_EPS), 1.0)
        sin = torch.where(safe, imag.float() / magnitude.clamp_min(PHASE_EPS), 0.0)
        ar, ai = (weights * cos).to(v.dtype), (weights * sin).to(v.dtype)
        out_real = ar @ vr - ai @ vi
        out_imag = ar @ vi + ai @ vr
        return torch.cat((out_real, out_imag), dim=-1)
