"""Attention-score soft-capping (Gemma 2: s -> c tanh(s / c)), alone and with a sliding window, in the
Triton prefill and split-KV decode kernels and the torch reference, against a float64 computation.
Ragged batches of whole prompts, prefill chunks on a cached prefix and decodes (the helpers of
test_triton_attention.py); on CPU the kernels run under the Triton interpreter."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from tests.kernels.test_triton_attention import MIXED, TOL, Case, make_case
from vllm_engine.attention import triton_kernels as K
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.attention.triton_attn import TritonAttentionBackend


def capped_reference(case: Case, scale: float, cap: Optional[float], window: Optional[int]) -> torch.Tensor:
    """float64 attention from the per-sequence K/V with capped scores (never read back from the cache;
    ``cap`` None: no cap)."""
    q = case.query.double().cpu()
    out = torch.zeros_like(q)
    row = 0
    for (ctx, q_len), k, v in zip(case.specs, case.full_k, case.full_v):
        group = q.shape[1] // k.shape[1]
        kk = k.repeat_interleave(group, dim=1).transpose(0, 1)
        vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
        s = q[row: row + q_len].transpose(0, 1) @ kk.transpose(1, 2) * scale
        if cap:
            s = cap * torch.tanh(s / cap)
        q_pos = torch.arange(ctx, ctx + q_len)[:, None]
        k_pos = torch.arange(ctx + q_len)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        out[row: row + q_len] = (torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv).transpose(0, 1)
        row += q_len
    return out


def _scaled_up(case: Case, factor: float) -> Case:
    """Queries multiplied so that raw scores reach well past the cap (tanh saturates: capping matters)."""
    case.query = case.query * factor
    return case


@pytest.mark.parametrize("dtype,cap,window", [(torch.float32, 5.0, None), (torch.float32, 2.0, 7),
                                              (torch.bfloat16, 5.0, None)])
def test_mixed_batch_with_soft_cap(dtype, cap, window):
    case = _scaled_up(make_case(MIXED, 16, 2, 2, 32, dtype, seed=11, num_pad_tokens=1), 4.0)
    scale = 1.0 / math.sqrt(32)
    ref_cache = case.kv_cache.clone()
    out = TritonAttentionBackend(prefill_block_m=16, tile_n=16).forward(
        case.query, case.key, case.value, case.kv_cache, case.meta, scale, window, logits_soft_cap=cap)
    want = capped_reference(case, scale, cap, window)
    uncapped = capped_reference(case, scale, 1e9, window)
    n = case.meta.num_actual_tokens
    got = out.double().cpu()[:n]
    assert (want[:n] - uncapped[:n]).abs().max() > 0.1, "the cap must change these scores"
    assert ((got - want[:n]).abs() - TOL[dtype] * want[:n].abs()).max().item() < TOL[dtype]
    ref = TorchAttentionBackend().forward(case.query, case.key, case.value, ref_cache, case.meta, scale, window,
                                          logits_soft_cap=cap)
    assert (ref.double().cpu()[:n] - want[:n]).abs().max().item() < 2 * TOL[dtype]


@pytest.mark.parametrize("num_splits", [1, 4])
def test_split_kv_decode_with_soft_cap(num_splits):
    case = _scaled_up(make_case([(36, 1), (149, 1), (70, 1)], 16, 2, 2, 32, torch.float32, seed=12), 4.0)
    scale, cap = 1.0 / math.sqrt(32), 3.0
    m = case.meta
    K.reshape_and_cache(case.key, case.value, case.kv_cache, m.slot_mapping)
    out = torch.full_like(case.query, float("nan"))
    K.paged_attention_decode(case.query, case.kv_cache, m.block_tables, m.seq_lens, m.query_start_loc, out,
                             m.num_seqs, scale, None, num_splits=num_splits, mixed=False, tile_n=16,
                             logits_soft_cap=cap)
    want = capped_reference(case, scale, cap, None)
    assert (out.double().cpu() - want).abs().max().item() < TOL[torch.float32]


def test_a_negative_cap_is_refused():
    with pytest.raises(ValueError, match="logits_soft_cap"):
        K._soft_cap_args(1.0, -1.0)
