"""Reference attention over the paged KV cache in plain PyTorch: the truth the kernels are tested against.

Loops over sequences in Python, so it is for CPU runs and tests, not for speed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``x`` as the cache stores it: an fp8 cache holds ``x / scale`` (in float32, as ``x * (1 /
    scale)``: the kernels' arithmetic) clamped to its finite range; other caches ignore ``scale``."""
    if dtype == torch.float8_e4m3fn:
        x = (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def from_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Cached keys or values back in ``dtype`` for attention: an fp8 cache's times ``scale``, in
    float32 (the kernels fold the scale into float32 arithmetic too)."""
    if x.dtype == torch.float8_e4m3fn:
        return x.float() * scale
    return x.to(dtype)


def write_kv_to_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter the new tokens' keys/values into their slots; slots < 0 (padding) are skipped. An fp8
    cache stores key / k_scale and value / v_scale."""
    num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape[1:]
    n = slot_mapping.shape[0]
    slots = slot_mapping[: key.shape[0]] if n >= key.shape[0] else slot_mapping
    key, value = key[: slots.shape[0]], value[: slots.shape[0]]
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    key, value = to_cache_dtype(key, kv_cache.dtype, k_scale), to_cache_dtype(value, kv_cache.dtype, v_scale)
    if kv_cache.dtype.itemsize == 1:  # no index_copy_ for fp8: the same bytes through uint8
        flat, key, value = flat.view(torch.uint8), key.view(torch.uint8), value.view(torch.uint8)
    flat[0].index_copy_(0, slots, key)
    flat[1].index_copy_(0, slots, value)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
              first_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions first_block * block_size .. seq_len-1 of one sequence: two
    [seq_len - first_block * block_size, num_kv_heads, head_dim]. Blocks before ``first_block`` (out
    of every query's sliding window: the block manager may have freed them) are not read."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[first_block:num_blocks].long()
    n = seq_len - first_block * block_size
    k = kv_cache[0, blocks].flatten(0, 1)[:n]
    v = kv_cache[1, blocks].flatten(0, 1)[:n]
    return k, v


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor],
        value: Optional[torch.Tensor],
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: Optional[int] = None,
        logits_soft_cap: Optional[float] = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        if key is not None:
            write_kv_to_cache(key, value, kv_cache, metadata.slot_mapping, k_scale, v_scale)
        qsl = metadata.query_start_loc_cpu or metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens_cpu or metadata.seq_lens.tolist()
        num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
        group = num_heads // num_kv_heads
        out = torch.zeros_like(query)
        for i in range(metadata.num_seqs):
            qs, qe, seq_len = qsl[i], qsl[i + 1], seq_lens[i]
            q_len = qe - qs
            if q_len == 0:
                continue
            first = 0  # the first key position read
            if q_len == seq_len and key is not None and kv_cache.dtype == key.dtype:
                # a whole prompt in one chunk: the new K/V are the context (an fp8 cache: read back, as the kernels do)
                k, v = key[qs:qe], value[qs:qe]
            else:
                block_size = kv_cache.shape[2]
                if sliding_window is not None:  # the first query sees nothing before this block
                    first = max(seq_len - q_len - sliding_window + 1, 0) // block_size * block_size
                k, v = gather_kv(kv_cache, metadata.block_tables[i], seq_len, first // block_size)
            q = query[qs:qe].transpose(0, 1)  # [H, q_len, D]
            k = from_cache_dtype(k.transpose(0, 1), q.dtype, k_scale).repeat_interleave(group, dim=0)  # [H, keys, D]
            v = from_cache_dtype(v.transpose(0, 1), q.dtype, v_scale).repeat_interleave(group, dim=0)
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(first, seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            if logits_soft_cap:
                scores = (q.float() @ k.float().transpose(1, 2)) * scale
                scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
                o = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v.float()
            else:
                o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
            out[qs:qe] = o.transpose(0, 1).to(out.dtype)
        return out
