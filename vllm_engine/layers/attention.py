"""The attention layer of a decoder: this rank's heads, from the fused q | k | v projection output
to the attention output, over the paged KV cache.

One pass (``fused_ops.qkv_rope_cache``: the Triton kernel on CUDA, composed torch ops elsewhere) does
the optional per-head q/k RMSNorm (Qwen3), the rotary embedding and the K/V cache write; the
backend (attention/backend.py) then attends over the cache with key/value None (already written).
A model without rotary embeddings (GPT-2: learned positions) passes ``rotary_emb=None``: q/k/v go to
the backend as they are, and the backend writes K/V.
"""

from __future__ import annotations

import math
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
    head_dim]``. Head counts are this rank's. ``rotary_emb`` (shared by every layer; None: no rotary)
    and ``q_norm`` / ``k_norm`` (owned, and named, by the model's attention module) are referenced, not
    registered. ``scale``: the score scale (default head_dim^-0.5); ``sliding_window`` and
    ``logits_soft_cap``: see attention/backend.py; ``cache_layout``: "kv", or "latent" for a layer
    that can keep one [head_dim] vector per token (attention/mla.py). ``kv_cache_group``: the KV cache
    group of the layer (set by the model runner for a model with several: core/kv_cache_groups.py); a
    layer of group g > 0 reads ``attn_metadata.groups[g]``, its group's block tables and slot mapping.
    ``k_scale`` / ``v_scale``: an fp8 cache's scales (keys stored as k / k_scale, read back times
    k_scale; likewise values), 1 unless the checkpoint gives them (``load_kv_scale``)."""

    kv_cache_group = 0
    k_scale = 1.0
    v_scale = 1.0

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, rotary_emb: Optional[RotaryEmbedding],
                 attn_backend: AttentionBackend, sliding_window: Optional[int] = None,
                 q_norm: Optional[RMSNorm] = None, k_norm: Optional[RMSNorm] = None,
                 scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                 cache_layout: str = "kv") -> None:
        super().__init__()
        if cache_layout not in ("kv", "latent"):
            raise ValueError(f"cache_layout must be 'kv' or 'latent', got {cache_layout!r}")
        # "latent" (DeepSeek's MLA): the layer can use one vector per token, [num_blocks, block_size,
        # head_dim] (attention/mla.py), half the bytes of the K/V layout, which it also accepts.
        self.cache_layout = cache_layout
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.attn_backend = attn_backend
        if (q_norm is None) != (k_norm is None):
            raise ValueError("q_norm and k_norm go together")
        if rotary_emb is None and q_norm is not None:
            raise ValueError("q/k norms are applied in the rotary pass: they need a rotary embedding")
        self.eps = q_norm.variance_epsilon if q_norm is not None else 0.0
        # Plain attributes (object.__setattr__): not submodules, so not registered or saved here.
        object.__setattr__(self, "rotary_emb", rotary_emb)
        object.__setattr__(self, "q_norm", q_norm)
        object.__setattr__(self, "k_norm", k_norm)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        if self.kv_cache_group:
            attn_metadata = attn_metadata.groups[self.kv_cache_group]
        q_norm, k_norm = self.q_norm, self.k_norm
        if self.rotary_emb is None:
            t, kv_size = qkv.shape[0], self.num_kv_heads * self.head_dim
            q, k, v = qkv.split([self.q_size, kv_size, kv_size], dim=-1)
            q = q.reshape(t, self.num_heads, self.head_dim).contiguous()
            k, v = k.reshape(t, self.num_kv_heads, self.head_dim), v.reshape(t, self.num_kv_heads, self.head_dim)
        else:
            q = fused_ops.qkv_rope_cache(
                positions, qkv, self.num_heads, self.num_kv_heads, self.rotary_emb.cos_sin_cache,
                self.rotary_emb.rotary_dim, q_norm.weight if q_norm is not None else None,
                k_norm.weight if k_norm is not None else None, self.eps, kv_cache, attn_metadata.slot_mapping,
                self.k_scale, self.v_scale)
            k = v = None  # written into the cache by the fused pass
        return self.attend(q, k, v, kv_cache, attn_metadata).reshape(qkv.shape[0], self.q_size)

    def attend(self, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], kv_cache: torch.Tensor,
               attn_metadata: AttentionMetadata) -> torch.Tensor:
        """The backend on q [T, num_heads, head_dim] and this step's k / v [T, num_kv_heads, head_dim]
        (None: already in the cache) with this layer's scale, window and cap -> [T, num_heads, head_dim].
        For a model that prepares q/k/v itself (DeepSeek's latent attention)."""
        return self.attn_backend.forward(q, k, v, kv_cache, attn_metadata, self.scale, self.sliding_window,
                                         self.logits_soft_cap, self.k_scale, self.v_scale)

    def load_kv_scale(self, name: str, loaded: torch.Tensor) -> None:
        """Sets ``k_scale`` or ``v_scale`` (``name``) from a checkpoint's per-tensor KV cache scale (one
        value: compressed-tensors' kv_cache_scheme, HF fp8 checkpoints). ValueError("...") for another
        name, a per-head scale or a value that is not positive and finite."""
        if name not in ("k_scale", "v_scale"):
            raise ValueError("is not a KV cache scale (k_scale or v_scale)")
        if loaded.numel() != 1:
            raise ValueError(f"has shape {tuple(loaded.shape)}: only one scale per layer is supported")
        value = float(loaded.double().reshape(()).item())
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"is {value}: a KV cache scale must be positive and finite")
        setattr(self, name, value)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"sliding_window={self.sliding_window}, qk_norm={self.q_norm is not None}, "
                f"soft_cap={self.logits_soft_cap}, rotary={self.rotary_emb is not None}")
