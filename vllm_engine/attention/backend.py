"""The attention backend interface, and the metadata every backend takes.

Paged KV cache layout, one tensor per layer::

    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]   (index 0: keys, 1: values)

A token at position ``p`` of a sequence with block table ``bt`` lives in slot
``bt[p // block_size] * block_size + p % block_size``; ``slot_mapping`` holds that slot for each
new token of the step (-1 for padding tokens, which are neither written nor attended).

A step's batch is flat ("varlen"): the new tokens of all sequences are concatenated, sequence
``i`` owning rows ``query_start_loc[i] : query_start_loc[i + 1]``. Its queries sit at the *end*
of its context: query row ``j`` of a sequence with ``seq_lens[i] = L`` and query length ``q`` is
at position ``L - q + j`` and attends (causally) to keys ``0 .. L - q + j``. A decode has q == 1,
a prefill chunk q > 1 on top of ``L - q`` cached tokens; both mix freely in one batch.

Two per-layer options change which keys a query sees and how it weighs them:
``sliding_window`` W (Mistral, Gemma 2/3 local layers): query at position p sees keys p - W + 1 .. p;
``logits_soft_cap`` c (Gemma 2): each score s = scale * q.k becomes c * tanh(s / c) before the softmax.

An fp8 (e4m3) cache holds each layer's keys divided by its ``k_scale`` and values divided by its
``v_scale`` (checkpoint ``self_attn.k_scale`` / ``v_scale``; 1 by default), clamped to +-448, and
attention reads them multiplied back. Other caches ignore the scales.

A model with several KV cache groups (core/kv_cache_groups.py: Gemma 2/3's sliding-window and full
layers) has a block table and a slot mapping per group: ``groups[g]`` is the metadata of group g's
layers (the same sequences, that group's ``block_tables`` and ``slot_mapping``); each ``Attention``
layer reads its own group's (``Attention.kv_cache_group``). With one group ``groups`` is None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass
class AttentionMetadata:
    num_actual_tokens: int  # rows of query that are real (the rest is CUDA-graph padding)
    num_seqs: int
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], on the device
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length including this step's tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    max_query_len: int
    max_seq_len: int
    # Host copies, so backends can plan (and the reference can loop) without a device sync.
    query_start_loc_cpu: Optional[list[int]] = None
    seq_lens_cpu: Optional[list[int]] = None
    # int32 [num_seqs]: the sequences longest first, a scheduling hint for kernels that give each
    # sequence its own programs (long ones start first, short ones fill the tail). None: index order.
    decode_order: Optional[torch.Tensor] = None
    # Several KV cache groups: the metadata of each group's layers (None: one group, this object).
    groups: Optional[tuple["AttentionMetadata", ...]] = None

    def with_groups(self, block_tables: torch.Tensor, slot_mapping: torch.Tensor) -> "AttentionMetadata":
        """This metadata for group 0 plus ``groups``, from every group's tables [G, num_seqs, width]
        and slot mappings [G, num_tokens]."""
        groups = tuple(replace(self, block_tables=block_tables[g], slot_mapping=slot_mapping[g])
                       for g in range(block_tables.shape[0]))
        return replace(self, block_tables=block_tables[0], slot_mapping=slot_mapping[0], groups=groups)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Writes this step's K/V into the paged cache, then computes attention for every query row.

    ``key``/``value`` None: the caller has already written them into the cache (the models do, in
    the fused q/k/v pass of ``fused_ops.qkv_rope_cache``)."""

    name: str = "abstract"

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: Optional[torch.Tensor],  # [num_tokens, num_kv_heads, head_dim], or None: already cached
        value: Optional[torch.Tensor],  # [num_tokens, num_kv_heads, head_dim], or None
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: Optional[int] = None,
        logits_soft_cap: Optional[float] = None,
        k_scale: float = 1.0,  # an fp8 cache's scales (see above)
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], dtype of query
        ...


def block_table_width(max_blocks_per_seq: int) -> int:
    """Columns of a block-table tensor holding up to ``max_blocks_per_seq`` blocks per row: rounded up
    to a multiple of 16. Triton specializes integer kernel arguments on divisibility by 16 (and on
    == 1), the row stride included, so a width that followed the longest sequence would compile new
    kernel variants in the middle of serving as lengths change; a multiple of 16 keeps one."""
    return -(-max(max_blocks_per_seq, 1) // 16) * 16


def get_attn_backend(device: torch.device, name: Optional[str] = None, multi_query_len: int = 0) -> AttentionBackend:
    """``name``: "torch" (reference, any device) or "triton" (CUDA). Default: triton on CUDA.
    ``multi_query_len``: k + 1 with speculative decoding (the Triton backend's verifying steps)."""
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from vllm_engine.attention.torch_ref import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from vllm_engine.attention.triton_attn import TritonAttentionBackend

        return TritonAttentionBackend(multi_query_len=multi_query_len)
    raise ValueError(f"Unknown attention backend {name!r}; choose 'torch' or 'triton'.")
