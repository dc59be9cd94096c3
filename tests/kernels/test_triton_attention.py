"""Triton paged attention vs a float64 computation (and the torch reference backend).

Random ragged batches mixing whole prompts, prefill chunks on a cached prefix and decodes, with
block tables that scatter each sequence over random blocks. On CPU the kernels run under the
Triton interpreter (conftest.py), so shapes are tiny and tiles are shrunk to cover many of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from vllm_engine.attention import triton_kernels as K
from vllm_engine.attention.backend import AttentionMetadata
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.attention.triton_attn import TritonAttentionBackend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass
class Case:
    query: torch.Tensor  # [T, H, D]
    key: torch.Tensor  # [T, KVH, D] (this step's tokens)
    value: torch.Tensor
    kv_cache: torch.Tensor  # holds the cached prefixes + random junk elsewhere
    meta: AttentionMetadata
    full_k: list[torch.Tensor]  # per sequence, float64 [L, KVH, D] of every position (as stored)
    full_v: list[torch.Tensor]
    specs: list[tuple[int, int]]  # (cached prefix length, query length) per sequence


def make_case(specs: list[tuple[int, int]], block_size: int, num_kv_heads: int, group: int, head_dim: int,
              dtype: torch.dtype, seed: int = 0, num_pad_tokens: int = 0,
              max_seq_len: Optional[int] = None) -> Case:
    """A batch of sequences (ctx, q_len); ``num_pad_tokens`` trailing rows belong to no sequence."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in specs]
    n_blocks = [-(-L // block_size) for L in seq_lens]
    num_blocks = sum(n_blocks) + 3  # spare blocks must stay untouched
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(max(n_blocks), 1)
    block_tables = torch.zeros(len(specs), width, dtype=torch.int32)
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q_rows, k_rows, v_rows, slots, full_k, full_v = [], [], [], [], [], []
    for i, ((ctx, q_len), L) in enumerate(zip(specs, seq_lens)):
        blocks = [perm.pop() for _ in range(n_blocks[i])]
        block_tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(L, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(L, num_kv_heads, head_dim, generator=g).to(dtype)
        pos_slots = [blocks[p // block_size] * block_size + p % block_size for p in range(L)]
        flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
        for p in range(ctx):  # the cached prefix
            flat[0, pos_slots[p]], flat[1, pos_slots[p]] = k[p], v[p]
        q_rows.append(torch.randn(q_len, num_kv_heads * group, head_dim, generator=g).to(dtype))
        k_rows.append(k[ctx:])
        v_rows.append(v[ctx:])
        slots += pos_slots[ctx:]
        full_k.append(k.double())
        full_v.append(v.double())
    H = num_kv_heads * group
    q_rows.append(torch.randn(num_pad_tokens, H, head_dim, generator=g).to(dtype))
    k_rows.append(torch.randn(num_pad_tokens, num_kv_heads, head_dim, generator=g).to(dtype))
    v_rows.append(torch.randn(num_pad_tokens, num_kv_heads, head_dim, generator=g).to(dtype))
    slots += [-1] * num_pad_tokens
    q_lens = [q for _, q in specs]
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    meta = AttentionMetadata(
        num_actual_tokens=qsl[-1], num_seqs=len(specs),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        max_query_len=max(q_lens), max_seq_len=max_seq_len or max(seq_lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
    )
    return Case(torch.cat(q_rows).to(DEVICE), torch.cat(k_rows).to(DEVICE), torch.cat(v_rows).to(DEVICE),
                kv_cache.to(DEVICE), meta, full_k, full_v, specs)


def reference(case: Case, scale: float, sliding_window: Optional[int]) -> torch.Tensor:
    """float64 attention from the per-sequence K/V (never read back from the cache)."""
    q = case.query.double().cpu()
    out = torch.zeros_like(q)
    row = 0
    for (ctx, q_len), k, v in zip(case.specs, case.full_k, case.full_v):
        group = q.shape[1] // k.shape[1]
        kk = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qq = q[row: row + q_len].transpose(0, 1)  # [H, q_len, D]
        s = qq @ kk.transpose(1, 2) * scale
        q_pos = torch.arange(ctx, ctx + q_len)[:, None]
        k_pos = torch.arange(ctx + q_len)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        out[row: row + q_len] = (p @ vv).transpose(0, 1)
        row += q_len
    return out


def expected_cache(case: Case) -> torch.Tensor:
    """The cache before the call with this step's K/V written at their (non-negative) slots."""
    exp = case.kv_cache.clone().cpu()
    flat = exp.view(2, -1, *exp.shape[3:])
    for t, slot in enumerate(case.meta.slot_mapping.tolist()):
        if slot >= 0:
            flat[0, slot], flat[1, slot] = case.key[t].cpu(), case.value[t].cpu()
    return exp


def run_and_check(case: Case, backend: TritonAttentionBackend, sliding_window: Optional[int] = None,
                  check_torch_ref: bool = True) -> torch.Tensor:
    dtype = case.query.dtype
    scale = 1.0 / math.sqrt(case.query.shape[-1])
    want_cache = expected_cache(case)
    ref_cache = case.kv_cache.clone()
    out = backend.forward(case.query, case.key, case.value, case.kv_cache, case.meta, scale, sliding_window)
    assert out.shape == case.query.shape and out.dtype == dtype
    assert torch.equal(case.kv_cache.cpu(), want_cache), "cache: wrong slots written or others touched"
    want = reference(case, scale, sliding_window)
    n = case.meta.num_actual_tokens
    got = out.double().cpu()
    assert torch.isfinite(got).all()
    err = ((got[:n] - want[:n]).abs() - TOL[dtype] * want[:n].abs()).max().item()  # abs + relative
    assert err < TOL[dtype], f"max error beyond tolerance {err}"
    assert (got[n:] == 0).all(), "padding rows must be zeros"
    if check_torch_ref:
        ref = TorchAttentionBackend().forward(case.query, case.key, case.value, ref_cache, case.meta, scale,
                                              sliding_window)
        assert (ref.double().cpu()[:n] - got[:n]).abs().max().item() < 2 * TOL[dtype]
    return out


MIXED = [(0, 19), (21, 6), (13, 1), (0, 1), (40, 1), (30, 17)]


@pytest.mark.parametrize(
    "dtype,block_size,num_kv_heads,group,head_dim,block_m,tile_n",
    [
        (torch.float32, 16, 2, 2, 64, 16, 16),
        (torch.bfloat16, 32, 1, 4, 128, 16, 32),  # MQA
        (torch.float16, 16, 2, 1, 64, 32, 16),  # MHA
        (torch.float32, 12, 1, 3, 96, 16, 16),  # odd block size, odd group, padded head dim
        (torch.float32, 16, 2, 2, 32, None, None),  # the GPU tile sizes
    ],
)
def test_mixed_batch(dtype, block_size, num_kv_heads, group, head_dim, block_m, tile_n):
    case = make_case(MIXED, block_size, num_kv_heads, group, head_dim, dtype, seed=1, num_pad_tokens=2)
    # Longest first, as the model runner passes it.
    case.meta.decode_order = torch.argsort(-case.meta.seq_lens.cpu(), stable=True).to(torch.int32).to(DEVICE)
    run_and_check(case, TritonAttentionBackend(prefill_block_m=block_m, tile_n=tile_n))


@pytest.mark.parametrize("window", [5, 24])
def test_sliding_window(window):
    specs = [(0, 35), (28, 9), (50, 1), (3, 1)]
    case = make_case(specs, 16, 2, 2, 32, torch.float32, seed=2)
    run_and_check(case, TritonAttentionBackend(prefill_block_m=16, tile_n=16), sliding_window=window)


def test_prefill_only_and_unknown_host_lengths():
    """A prefill-only batch; then the same batch with no host copy of query_start_loc, where the
    backend must launch both kernels and let each skip the other's sequences on the device."""
    case = make_case([(0, 20), (9, 30)], 16, 2, 2, 32, torch.float32, seed=3)
    run_and_check(case, TritonAttentionBackend(prefill_block_m=16, tile_n=16))
    case = make_case(MIXED, 16, 2, 2, 32, torch.float32, seed=4)
    case.meta.query_start_loc_cpu = None
    run_and_check(case, TritonAttentionBackend(prefill_block_m=16, tile_n=16), check_torch_ref=False)


@pytest.mark.parametrize("num_splits,early_v", [(1, False), (4, False), (16, False), (4, True)])
@pytest.mark.parametrize("window", [None, 40])
def test_decode_splits(num_splits, early_v, window):
    """Split-KV decoding for any split count, with V loaded before or after the q.k dot; an entry with
    seq_len 0 (CUDA-graph padding) gives zeros."""
    specs = [(36, 1), (149, 1), (299, 1), (0, 1)]
    case = make_case(specs, 16, 2, 2, 32, torch.float32, seed=5)
    scale = 1.0 / math.sqrt(32)
    m = case.meta
    m.seq_lens[3] = 0  # padding entry: nothing to attend, nothing written
    m.slot_mapping[3] = -1
    K.reshape_and_cache(case.key, case.value, case.kv_cache, m.slot_mapping)
    out = torch.full_like(case.query, float("nan"))
    K.paged_attention_decode(case.query, case.kv_cache, m.block_tables, m.seq_lens, m.query_start_loc, out,
                             m.num_seqs, scale, window, num_splits=num_splits, mixed=False, tile_n=16,
                             early_v=early_v)
    want = reference(case, scale, window)
    got = out.double().cpu()
    assert (got[:3] - want[:3]).abs().max().item() < TOL[torch.float32]
    assert (got[3] == 0).all()


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_seq_order_changes_only_the_schedule(num_splits):
    """Programs started longest first (a seq_order permutation) give the same output, bit for bit,
    as index order, in a mixed batch whose prefill sequences the decode kernel skips."""
    case = make_case(MIXED, 16, 2, 2, 32, torch.float32, seed=8)
    m = case.meta
    scale = 1.0 / math.sqrt(32)
    K.reshape_and_cache(case.key, case.value, case.kv_cache, m.slot_mapping)
    outs = []
    for order in (None, torch.argsort(-m.seq_lens.cpu(), stable=True).to(torch.int32).to(DEVICE),
                  torch.randperm(m.num_seqs, generator=torch.Generator().manual_seed(0)).to(torch.int32).to(DEVICE)):
        out = torch.zeros_like(case.query)
        K.paged_attention_decode(case.query, case.kv_cache, m.block_tables, m.seq_lens, m.query_start_loc, out,
                                 m.num_seqs, scale, None, num_splits=num_splits, mixed=True, tile_n=16, seq_order=order)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # ...and the decode rows are right.
    want = reference(case, scale, None)
    qsl = m.query_start_loc_cpu
    rows = [qsl[i] for i in range(m.num_seqs) if qsl[i + 1] - qsl[i] == 1]
    assert (outs[0].double().cpu()[rows] - want[rows]).abs().max().item() < TOL[torch.float32]


def test_decode_only_graph_style_plan():
    """Decode-only step planned from a large max_seq_len (as under CUDA graphs: max_model_len), so most
    splits are empty for these short contexts; bf16 with head_dim 128 and GQA 4."""
    specs = [(70, 1), (5, 1), (130, 1)]
    case = make_case(specs, 16, 1, 4, 128, torch.bfloat16, seed=6, num_pad_tokens=1, max_seq_len=4096)
    backend = TritonAttentionBackend(num_sms=24, min_tokens_per_split=64, tile_n=16)
    assert backend.decode_splits(3, 1, 4096, case.query.device) == 16
    run_and_check(case, backend)


# A verifying step: each sequence's last token and up to k proposals (1..k + 1 rows), long contexts.
VERIFY = [(36, 5), (149, 1), (299, 3), (0, 2), (70, 5), (5, 4)]


@pytest.mark.parametrize(
    "dtype,num_kv_heads,group,head_dim,num_sms,window,cap",
    [
        (torch.float32, 2, 2, 32, 64, None, None),  # several splits per sequence
        (torch.float32, 1, 3, 96, 4, None, None),  # odd group, padded head dim, one split
        (torch.bfloat16, 2, 4, 64, 64, 40, None),  # GQA 4, a sliding window
        (torch.float16, 2, 1, 32, 64, None, 30.0),  # MHA, a soft cap (Gemma 2)
    ],
)
def test_verifying_step_takes_the_split_kv_decode(dtype, num_kv_heads, group, head_dim, num_sms, window, cap):
    """Steps of up to multi_query_len rows per sequence run the multi-query decode kernel (causal among
    a sequence's rows, split over its context, partial results merged per row) and equal the
    float64 reference; CUDA-graph padding rows stay zeros; the prefill kernel is not launched."""
    case = make_case(VERIFY, 16, num_kv_heads, group, head_dim, dtype, seed=11, num_pad_tokens=3,
                     max_seq_len=2048 if num_sms == 64 else None)
    backend = TritonAttentionBackend(num_sms=num_sms, min_tokens_per_split=32, tile_n=16, multi_query_len=5)
    splits = backend.decode_splits(len(VERIFY), num_kv_heads, case.meta.max_seq_len, case.query.device)
    assert (splits > 1) == (num_sms == 64)
    launched = []
    real = K.paged_attention_prefill
    K.paged_attention_prefill = lambda *a, **kw: (launched.append(1), real(*a, **kw))[1]
    try:
        if cap is None:
            run_and_check(case, backend, sliding_window=window)
        else:
            scale = 1.0 / math.sqrt(head_dim)
            out = backend.forward(case.query, case.key, case.value, case.kv_cache, case.meta, scale,
                                  logits_soft_cap=cap)
            ref = TorchAttentionBackend().forward(case.query, case.key, case.value, case.kv_cache, case.meta,
                                                  scale, logits_soft_cap=cap)
            n = case.meta.num_actual_tokens
            assert (out.double().cpu()[:n] - ref.double().cpu()[:n]).abs().max().item() < 2 * TOL[dtype]
            assert (out.double().cpu()[n:] == 0).all()
    finally:
        K.paged_attention_prefill = real
    assert not launched
    # A tile past MAX_MULTI_QUERY_ROWS (many proposals, a wide kv group) takes the prefill kernel.
    assert backend.multi_query_rows(group) == 5 and backend.multi_query_rows(32) == 0
    assert TritonAttentionBackend(multi_query_len=16).multi_query_rows(8) == 16
    assert TritonAttentionBackend(multi_query_len=17).multi_query_rows(8) == 0
    assert TritonAttentionBackend(multi_query_len=1).multi_query_rows(1) == 0  # k + 1 >= 2, or off
    wide = TritonAttentionBackend(num_sms=num_sms, min_tokens_per_split=32, tile_n=16, prefill_block_m=16,
                                  multi_query_len=100)
    if cap is None and group > 1:
        real_prefill = K.paged_attention_prefill
        K.paged_attention_prefill = lambda *a, **kw: (launched.append(1), real_prefill(*a, **kw))[1]
        try:
            run_and_check(make_case(VERIFY, 16, num_kv_heads, group, head_dim, dtype, seed=13), wide,
                          sliding_window=window)
        finally:
            K.paged_attention_prefill = real_prefill
        assert launched
    # A step with a longer query (a prompt chunk) goes back to the prefill and decode kernels.
    case = make_case(VERIFY + [(10, 6)], 16, num_kv_heads, group, head_dim, dtype, seed=12)
    if cap is None:
        run_and_check(case, backend, sliding_window=window)


def test_reshape_and_cache_strided_views():
    """K/V as column slices of a fused qkv projection (non-contiguous rows); -1 slots are skipped."""
    g = torch.Generator().manual_seed(7)
    T, kvh, D, bs, nb = 5, 2, 16, 4, 6
    qkv = torch.randn(T, (4 + 2 * kvh) * D, generator=g)
    k = qkv[:, 4 * D: (4 + kvh) * D].view(T, kvh, D)
    v = qkv[:, (4 + kvh) * D:].view(T, kvh, D)
    cache = torch.randn(2, nb, bs, kvh, D, generator=g)
    slots = torch.tensor([3, -1, 17, 0, 23], dtype=torch.int64)
    want = cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want[0, s // bs, s % bs], want[1, s // bs, s % bs] = k[t], v[t]
    cache, k, v, slots = cache.to(DEVICE), k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE)
    K.reshape_and_cache(k, v, cache, slots)
    assert torch.equal(cache.cpu(), want)


def test_num_decode_splits_plan():
    # Llama-8B at batch 1 on 132 SMs: about two programs per SM for a 32K context...
    assert K.num_decode_splits(1, 8, 32768, 132) == 32
    assert [K.num_decode_splits(b, 8, 4096, 132) for b in (1, 4, 8, 16, 32, 64)] == [16, 8, 4, 2, 1, 1]
    # ...but few for a short context, and one when the batch alone fills the GPU.
    assert K.num_decode_splits(1, 8, 300, 132) == 2
    assert K.num_decode_splits(256, 8, 32768, 132) == 1


def test_kernels_compile_for_sm90():
    """Every kernel compiles for the H100 (sm_90) with triton's bundled ptxas, no GPU needed: catches
    typing errors the interpreter lets through. K/V loads must be software-pipelined (cp.async) and
    16-byte vectorized, and the prefill dots must use wgmma. The new-token kernels (fused q/k/v pass,
    GEMV, sampler) must not spill registers."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(root / "tests/kernels/gpu_check.py"), "--compile-sm90"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ast.literal_eval(line) for line in proc.stdout.splitlines() if line.startswith("{'kernel'")]
    from vllm_engine.layers.triton_linear import GEMM_CONFIGS, GEMV_CONFIGS

    # 8: attention and fused ops, 3: the fp8-cache write, decode and prefill, 2: a verifying step's decode
    assert len(rows) == 8 + 3 + 2 + 2 + 2 * len(GEMV_CONFIGS) + 3 + len(GEMM_CONFIGS) + 2
    for row in rows:
        # chunk argmax reads a handful of floats per row; the GEMM's tiles go through cp.async instead
        if row["kernel"] not in ("_chunk_argmax_kernel", "_matmul_kernel_impl"):
            assert row["vec16"], row
        assert row["registers"] is not None and row["registers"] <= 255, row
        if row["kernel"] in ("_qkv_rope_cache_kernel", "_gumbel_argmax_kernel", "_rms_norm_kernel",
                             "_silu_and_mul_kernel", "_reshape_and_cache_kernel"):
            assert row["spill_bytes"] == 0, row
        if row["kernel"] in ("_decode_kernel", "_multi_query_decode_kernel", "_prefill_kernel", "_matmul_kernel_impl"):
            assert row["cp_async"] > 0, row
        # every kernel but the sampler's waits for its predecessor under PDL (layers/pdl.py)
        assert row["pdl"] == (row["kernel"] not in ("_gumbel_argmax_kernel", "_chunk_argmax_kernel")), row
    assert all(r["wgmma"] for r in rows if r["kernel"] == "_prefill_kernel")


def test_block_table_width_is_a_multiple_of_16_that_holds_every_block():
    from vllm_engine.attention.backend import block_table_width

    for n in range(0, 100):
        w = block_table_width(n)
        assert w % 16 == 0 and w >= max(n, 1) and w - max(n, 1) < 16


def test_warmup_launches_every_variant_an_eager_step_can_choose_and_only_reads_the_cache(monkeypatch):
    """Startup compiles the prefill kernel (with and without decodes beside it) and the decode kernel at
    every split count the plan can pick for up to max_num_seqs decodes and max_model_len tokens."""
    backend = TritonAttentionBackend(num_sms=8, min_tokens_per_split=64, max_decode_splits=8,
                                     prefill_block_m=16, tile_n=16)
    max_num_seqs, max_model_len, kvh = 6, 600, 2
    # Independent enumeration: the plan at every (decodes, longest context) pair.
    want = {K.num_decode_splits(n, kvh, length, 8, 64, 8) for n in range(1, max_num_seqs + 1)
            for length in range(1, max_model_len + 1)}
    assert set(backend.mixed_step_splits(kvh, max_model_len, torch.device(DEVICE))) == want
    assert len(want) > 2
    calls = {"decode": [], "prefill": []}
    real_decode, real_prefill = K.paged_attention_decode, K.paged_attention_prefill
    monkeypatch.setattr(K, "paged_attention_decode",
                        lambda *a, **kw: (calls["decode"].append(kw["num_splits"]), real_decode(*a, **kw))[1])
    monkeypatch.setattr(K, "paged_attention_prefill",
                        lambda *a, **kw: (calls["prefill"].append(kw["skip_decodes"]), real_prefill(*a, **kw))[1])
    cache = torch.randn(2, 4, 16, kvh, 32, device=DEVICE)
    before = cache.clone()
    n = backend.warmup(cache, num_heads=4, max_model_len=max_model_len)
    assert n == len(want) + 2
    assert sorted(calls["decode"]) == sorted(want) and sorted(calls["prefill"]) == [False, True]
    assert torch.equal(cache, before)


def test_warmup_compiles_the_verifying_variant_at_every_split_count(monkeypatch):
    """With speculative decoding (multi_query_len = k + 1) warm-up also launches the multi-query decode
    at each split count; without it, never."""
    calls = []
    real = K.paged_attention_decode
    monkeypatch.setattr(K, "paged_attention_decode",
                        lambda *a, **kw: (calls.append((kw["num_splits"], kw.get("queries", 1))), real(*a, **kw))[1])
    cache = torch.randn(2, 4, 16, 2, 32, device=DEVICE)
    for multi in (0, 3):
        calls.clear()
        backend = TritonAttentionBackend(num_sms=8, min_tokens_per_split=64, max_decode_splits=8, prefill_block_m=16,
                                         tile_n=16, multi_query_len=multi)
        splits = backend.mixed_step_splits(2, 600, torch.device(DEVICE))
        n = backend.warmup(cache, num_heads=4, max_model_len=600)
        want = [(p, 1) for p in splits] + ([(p, 3) for p in splits] if multi else [])
        assert sorted(calls) == sorted(want) and n == len(want) + 2


def test_warmup_launches_with_the_model_dtype_for_an_fp8_cache(monkeypatch):
    """An fp8 cache's kernels take queries in the model's dtype: warm-up must compile those variants
    (fp8 queries would be a variant no step launches, and fp8 dots need head_dim >= 32 on a GPU)."""
    from vllm_engine.attention import triton_kernels as K

    seen = []
    real = K.paged_attention_prefill
    monkeypatch.setattr(K, "paged_attention_prefill", lambda q, *a, **kw: (seen.append(q.dtype), real(q, *a, **kw))[1])
    monkeypatch.setattr(K, "paged_attention_decode", lambda q, *a, **kw: seen.append(q.dtype))
    cache = torch.zeros(2, 4, 16, 2, 32, device=DEVICE).to(torch.float8_e4m3fn)
    TritonAttentionBackend().warmup(cache, num_heads=4, max_model_len=64, query_dtype=torch.float32)
    assert seen and set(seen) == {torch.float32}
