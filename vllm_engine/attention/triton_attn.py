"""Attention backend on Triton kernels (the GPU fast path); same contract as the torch reference.

One ``forward`` = one cache-write launch, then
  * decode-only batches (``max_query_len == 1``): the split-KV decode kernel (+ its reduce when the
    plan has more than one split). The plan depends only on ``num_seqs`` and ``max_seq_len`` (the
    CUDA-graph runner pins it to ``max_model_len``), so a captured graph replays correctly for any
    real lengths; the kernel re-divides each sequence's actual length among the splits on device.
  * verifying steps (speculative decoding; ``max_query_len`` up to ``multi_query_len``, k + 1): the
    split-KV decode kernel over every sequence's few query rows, causal among them, so a long
    context is still spread over many programs (the prefill kernel gives a sequence one program
    per head). Its plan depends only on ``num_seqs`` and ``max_seq_len``, as the decode plan.
  * mixed batches: the tiled prefill kernel for sequences with q_len > 1 and the decode kernel for
    those with q_len == 1 (each kernel skips the other's sequences on device; with the host copy of
    ``query_start_loc`` we launch only the kernels that have work).
No host<->device sync and no Python loop over sequences. Off CUDA (CPU tests) the kernels run
under ``TRITON_INTERPRET=1``; without it, CPU tensors fall back to the torch reference.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata, block_table_width
from vllm_engine.layers.parallel_compile import compile_ahead


def triton_usable(device: torch.device) -> bool:
    """True when Triton kernels can run on tensors of ``device`` (CUDA, or anything when interpreted)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# The most rows (query rows x the kv group's heads, each a power of 2) of a multi-query decode
# program's tile; a verifying step beyond it (many proposals, a wide group) takes the prefill kernel.
MAX_MULTI_QUERY_ROWS = 128


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_sms: Optional[int] = None, max_decode_splits: int = 64,
                 min_tokens_per_split: int = 256, prefill_block_m: Optional[int] = None,
                 tile_n: Optional[int] = None, multi_query_len: int = 0) -> None:
        """``num_sms``: multiprocessor count for the split plan (read from the device when None).
        ``prefill_block_m`` / ``tile_n``: tile sizes (queries per prefill program, keys per loop
        step); None picks per head_dim. Tests shrink them to cover many tiles with tiny shapes.
        ``multi_query_len``: the most query rows per sequence that a step may have to take the
        split-KV decode path (k + 1 with speculative decoding; 0: that path is off)."""
        self.multi_query_len = multi_query_len if multi_query_len > 1 else 0
        self._num_sms = num_sms
        self.max_decode_splits = max_decode_splits
        self.min_tokens_per_split = min_tokens_per_split
        self.prefill_block_m = prefill_block_m
        self.tile_n = tile_n

    def _sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                             if device.type == "cuda" else 8)
        return self._num_sms

    def decode_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
        from vllm_engine.attention.triton_kernels import num_decode_splits

        return num_decode_splits(num_seqs, num_kv_heads, max_seq_len, self._sms(device),
                                 self.min_tokens_per_split, self.max_decode_splits)

    def multi_query_rows(self, group: int) -> int:
        """``multi_query_len`` when a multi-query decode tile for it and ``group`` query heads per kv
        head fits ``MAX_MULTI_QUERY_ROWS`` rows, else 0 (verifying steps then take the prefill kernel)."""
        q = self.multi_query_len
        return q if q and _pow2(q) * _pow2(group) <= MAX_MULTI_QUERY_ROWS else 0

    def mixed_step_splits(self, num_kv_heads: int, max_model_len: int, device: torch.device) -> list[int]:
        """Every split count ``forward`` can choose for the decodes of an eager step: the plan is a
        power of 2 that grows with the context and shrinks with the batch, so it is every power of 2
        up to the plan for one sequence at ``max_model_len``."""
        top = self.decode_splits(1, num_kv_heads, max_model_len, device)
        return [1 << i for i in range(top.bit_length())]

    @torch.inference_mode()
    def warmup(self, kv_cache: torch.Tensor, num_heads: int, max_model_len: int,
               query_dtype: Optional[torch.dtype] = None) -> int:
        """Compiles, before any request, every kernel variant an eager (mixed or uncaptured) step can
        launch: the prefill kernel with and without decodes beside it, and the decode kernel and its
        reduce at each split count the plan can choose (Triton compiles one variant per value of a
        constexpr). Otherwise the first requests would wait for these compiles (seconds on an H100
        host). They compile side by side (``parallel_compile.compile_ahead``); where that is off
        they are launched, on a 2-sequence batch (a 2-token prompt and a decode) that only reads
        ``kv_cache``. ``query_dtype``: the model's dtype (default: the cache's; an fp8 cache's
        kernels take queries in the model's dtype). Returns the number of variants."""
        from vllm_engine.attention import triton_kernels as K

        dev = kv_cache.device
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        query = torch.zeros(3, num_heads, head_dim, dtype=query_dtype or kv_cache.dtype, device=dev)
        out = torch.empty_like(query)
        block_tables = torch.zeros(2, block_table_width(1), dtype=torch.int32, device=dev)
        seq_lens = torch.tensor([2, 1], dtype=torch.int32, device=dev)
        qsl = torch.tensor([0, 2, 3], dtype=torch.int32, device=dev)
        order = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        common = (query, kv_cache, block_tables, seq_lens, qsl, out, 2, 1.0, None)
        launches = 0
        multi = self.multi_query_rows(num_heads // num_kv_heads)  # verifying steps' variants too
        with compile_ahead():
            for skip_decodes in (True, False):
                K.paged_attention_prefill(*common, skip_decodes=skip_decodes, block_m=self.prefill_block_m,
                                          tile_n=self.tile_n)
                launches += 1
            for splits in self.mixed_step_splits(num_kv_heads, max_model_len, dev):
                K.paged_attention_decode(*common, num_splits=splits, mixed=True, tile_n=self.tile_n, seq_order=order)
                launches += 1
                if multi:
                    K.paged_attention_decode(*common, num_splits=splits, mixed=True, tile_n=self.tile_n,
                                             queries=multi)
                    launches += 1
        return launches

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: Optional[torch.Tensor],  # [num_tokens, num_kv_heads, head_dim], or None: already cached
        value: Optional[torch.Tensor],
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: Optional[int] = None,
        logits_soft_cap: Optional[float] = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], dtype of query
        if not triton_usable(query.device):
            from vllm_engine.attention.torch_ref import TorchAttentionBackend

            return TorchAttentionBackend().forward(query, key, value, kv_cache, metadata, scale, sliding_window,
                                                   logits_soft_cap, k_scale, v_scale)
        from vllm_engine.attention import triton_kernels as K

        if key is not None:
            K.reshape_and_cache(key, value, kv_cache, metadata.slot_mapping, k_scale, v_scale)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        num_seqs = metadata.num_seqs
        qsl_cpu = metadata.query_start_loc_cpu
        # Rows past the last sequence (padding) belong to no sequence: give them zeros, not garbage.
        covered = qsl_cpu[num_seqs] if qsl_cpu is not None else metadata.num_actual_tokens
        if covered < query.shape[0]:
            out[covered:].zero_()
        if num_seqs == 0:
            return out
        num_kv_heads = kv_cache.shape[3]
        common = (query, kv_cache, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc, out,
                  num_seqs, scale, sliding_window)

        if 1 < metadata.max_query_len <= self.multi_query_rows(query.shape[1] // num_kv_heads):  # a verifying step
            splits = self.decode_splits(num_seqs, num_kv_heads, metadata.max_seq_len, query.device)
            K.paged_attention_decode(*common, num_splits=splits, mixed=True, tile_n=self.tile_n,
                                     logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale,
                                     queries=self.multi_query_len)
            return out
        if metadata.max_query_len <= 1:
            num_decodes, num_prefills = num_seqs, 0
        elif qsl_cpu is not None:
            q_lens = np.diff(np.asarray(qsl_cpu[: num_seqs + 1]))
            num_decodes = int((q_lens == 1).sum())
            num_prefills = int((q_lens > 1).sum())
        else:  # unknown split: launch both, each skips the other's sequences on device
            num_decodes = num_prefills = num_seqs
        if num_prefills:
            K.paged_attention_prefill(*common, skip_decodes=num_decodes > 0, block_m=self.prefill_block_m,
                                      tile_n=self.tile_n, logits_soft_cap=logits_soft_cap, k_scale=k_scale,
                                      v_scale=v_scale)
        if num_decodes:
            splits = self.decode_splits(num_decodes, num_kv_heads, metadata.max_seq_len, query.device)
            # mixed=True: sequences with q_len != 1 (prefills, or empty padding entries) are skipped.
            K.paged_attention_decode(*common, num_splits=splits, mixed=True, tile_n=self.tile_n,
                                     seq_order=metadata.decode_order, logits_soft_cap=logits_soft_cap,
                                     k_scale=k_scale, v_scale=v_scale)
        return out
