"""The attention layer of a decoder: this rank's heads, from the fused q | k | v projection output
to the attention output, over the paged KV cache.

One pass (``fused_ops.qkv_rope_cache``: the Triton kernel on CUDA, composed torch ops elsewhere) does
the optional per-head q/k RMSNorm (Qwen3), the rotary embedding and the K/V cache write; the
backend (attention/backend.py) then attends over the cache with key/value None (already written).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata
from vllm_engine.layers import fused_ops
from vllm_engine.layers.layernorm import RMSNorm
from vllm_engine.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    """``attn(positions [T], qkv [T, (num_heads + 2 num_kv_heads) * head_dim], kv_cache, attn_metadata)
    -> [T, num_heads * head_dim]``; ``kv_cache``: this layer's ``[2, blocks, block_size, num_kv_heads,
    head_dim]``. Head counts are this rank's. ``rotary_emb`` (shared by every layer) and ``q_norm`` /
    ``k_norm`` (owned, and named, by the model's attention module) are referenced, not registered."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, rotary_emb: RotaryEmbedding,
                 attn_backend: AttentionBackend, sliding_window: Optional[int] = None,
                 q_norm: Optional[RMSNorm] = None, k_norm: Optional[RMSNorm] = None,
                 scale: Optional[float] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.sliding_window = sliding_window
        self.attn_backend = attn_backend
        if (q_norm is None) != (k_norm is None):
            raise ValueError("q_norm and k_norm go together")
        self.eps = q_norm.variance_epsilon if q_norm is not None else 0.0
        # Plain attributes (object.__setattr__): not submodules, so not registered or saved here.
        object.__setattr__(self, "rotary_emb", rotary_emb)
        object.__setattr__(self, "q_norm", q_norm)
        object.__setattr__(self, "k_norm", k_norm)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q_norm, k_norm = self.q_norm, self.k_norm
        q = fused_ops.qkv_rope_cache(
            positions, qkv, self.num_heads, self.num_kv_heads, self.rotary_emb.cos_sin_cache,
            self.rotary_emb.rotary_dim, q_norm.weight if q_norm is not None else None,
            k_norm.weight if k_norm is not None else None, self.eps, kv_cache, attn_metadata.slot_mapping)
        out = self.attn_backend.forward(q, None, None, kv_cache, attn_metadata, self.scale, self.sliding_window)
        return out.reshape(qkv.shape[0], self.q_size)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"sliding_window={self.sliding_window}, qk_norm={self.q_norm is not None}")
