"""Attention: rotary position tables, the (GQA) attention layer and its KV cache.

Its own module so that variants (training/complex_attention.py) build on the layer without an
import cycle with ``training.model``, which assembles the blocks. Rotary embeddings use the
half-split (``rotate_half``) convention, which is what Hugging Face applies to unpermuted weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from training.config import ModelConfig


def rope_tables(head_dim: int, max_len: int, theta: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim) in the half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by position; tables are (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


@functools.cache
def _flex(device_type: str):
    """FlexAttention for ``device_type``: compiled once per process on CUDA (a fused kernel; inside a
    compiled block it is inlined into the block's graph), eager elsewhere (as torchtitan wraps it)."""
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.attention.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.o_proj.residual_projection = True  # type: ignore[attr-defined]
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | BlockMask | None = None, kv: LayerKV | None = None) -> torch.Tensor:
        """``mask`` replaces the plain causal mask: a (B, 1, T, S) bool tensor, True = may attend
        (packed examples on SDPA, a cached prefix), or a :class:`BlockMask` (packed examples on
        FlexAttention); ``kv`` holds this layer's keys and values from earlier calls."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            k, v = kv.append(k, v)
        y = self.attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None) -> torch.Tensor:
        """(B, H, T, D) queries over (B, Hkv, S, D) keys and values -> (B, H, T, D); causal unless ``mask``."""
        # GQA inside the kernel: no repeat_interleave copy of K and V per step.
        if isinstance(mask, BlockMask):
            return _flex(q.device.type)(q, k, v, block_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              dropout_p=self.dropout if self.training else 0.0,
                                              enable_gqa=self.n_kv_heads != self.n_heads)


class LayerKV:
    """One layer's keys and values, preallocated to the cache's capacity and filled in place."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values after those already held; return all of them."""
        start, end = self.cache.length, self.cache.length + k.shape[2]
        if end > self.cache.capacity:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.cache.capacity} (max_seq_len)")
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.cache.capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for incremental decoding; ``length`` positions are filled."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.layers = [LayerKV(self) for _ in range(num_layers)]
