"""Sliding-window attention never reads the blocks that lie wholly before every query's window, so the
block manager may free (and reuse) them: here those blocks hold NaN (and their table entries point at
one shared NaN block), and the Triton kernels and the torch reference still give the float64 result."""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.test_attention_soft_cap import capped_reference
from tests.kernels.test_triton_attention import TOL, make_case
from vllm_engine.attention import triton_kernels as K
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.attention.triton_attn import TritonAttentionBackend

BLOCK = 8


def _free_out_of_window_blocks(case, window: int) -> int:
    """NaN into every block before the window of each sequence's first query; returns how many."""
    m = case.meta
    freed = 0
    nan_block = int(m.block_tables.max()) + 1  # past every real block: give the cache one more
    extra = torch.full_like(case.kv_cache[:, :1], float("nan"))
    case.kv_cache = torch.cat((case.kv_cache, extra), dim=1)
    for i, (ctx, q_len) in enumerate(case.specs):
        first_needed = max(ctx - window + 1, 0)
        for b in range(first_needed // BLOCK):
            case.kv_cache[:, int(m.block_tables[i, b])] = float("nan")
            m.block_tables[i, b] = nan_block if b % 2 else m.block_tables[i, b]  # freed, some reused elsewhere
            freed += 1
    return freed


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("window", [5, 19])
def test_blocks_before_the_window_are_never_read(backend, window):
    specs = [(0, 35), (40, 9), (50, 1), (27, 1), (3, 1)]  # a prompt, a chunk on a long prefix, decodes
    case = make_case(specs, BLOCK, 2, 2, 32, torch.float32, seed=9)
    assert _free_out_of_window_blocks(case, window) > 4
    scale = 1.0 / math.sqrt(32)
    impl = TritonAttentionBackend(prefill_block_m=16, tile_n=16) if backend == "triton" else TorchAttentionBackend()
    out = impl.forward(case.query, case.key, case.value, case.kv_cache, case.meta, scale, window)
    want = capped_reference(case, scale, 1e9, window)  # a cap this large changes nothing
    got = out.double().cpu()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < TOL[torch.float32]


def test_split_kv_decode_skips_freed_blocks():
    case = make_case([(60, 1), (33, 1)], BLOCK, 2, 2, 32, torch.float32, seed=10)
    _free_out_of_window_blocks(case, 12)
    m = case.meta
    K.reshape_and_cache(case.key, case.value, case.kv_cache, m.slot_mapping)
    out = torch.zeros_like(case.query)
    K.paged_attention_decode(case.query, case.kv_cache, m.block_tables, m.seq_lens, m.query_start_loc, out,
                             m.num_seqs, 32 ** -0.5, 12, num_splits=4, mixed=False, tile_n=16)
    want = capped_reference(case, 32 ** -0.5, 1e9, 12)
    got = out.double().cpu()
    assert torch.isfinite(got).all() and (got - want).abs().max().item() < TOL[torch.float32]
