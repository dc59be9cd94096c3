"""Triton kernels for paged attention: cache write, tiled prefill, split-KV decode (+ reduce).

Cache layout (see backend.py): ``kv_cache[2, num_blocks, block_size, num_kv_heads, head_dim]``; the
kernels take ``kv_cache[0]`` / ``kv_cache[1]`` with their strides and need only the last dim
contiguous. Token ``t`` of sequence ``s`` lives in block ``block_tables[s, t // block_size]`` at
offset ``t % block_size``.

Every launch wrapper works without a host<->device sync: sequence boundaries and lengths are read
on the device; the host only chooses grid sizes (from ``num_tokens``, ``num_seqs`` and a split
count), so a decode launch is CUDA-graph capturable. Softmax runs in fp32 and in base 2 (``exp2``
with the scale folded into ``log2(e)``), the usual FlashAttention trick that saves a multiply.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from vllm_engine.layers import pdl
from vllm_engine.layers.parallel_compile import launch
from vllm_engine.layers.pdl import pdl_prologue

LOG2E = 1.4426950408889634


@triton.jit
def _reshape_and_cache_kernel(
    K, V, KCache, VCache, Slots,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch, inv_k_scale, inv_v_scale,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr, PDL: tl.constexpr,
):
    """One program per new token: copies its [num_kv_heads, head_dim] keys and values into its slot
    (into an fp8 cache times ``inv_k_scale`` / ``inv_v_scale``, clamped to +-448 first)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)  # step metadata: may be read before the PDL wait
    pdl_prologue(PDL)
    if slot < 0:  # padding token: write nothing
        return
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + offs_h * stride_ch + offs_d
    if NUM_KV_HEADS == BLOCK_H and HEAD_DIM == BLOCK_D:  # no mask: lets the compiler use 16-byte accesses
        k = tl.load(K + t * stride_kt + offs_h * stride_kh + offs_d)
        tl.store(KCache + dst, to_cache_value(k, KCache, KV_FP8, inv_k_scale))
        v = tl.load(V + t * stride_vt + offs_h * stride_vh + offs_d)
        tl.store(VCache + dst, to_cache_value(v, VCache, KV_FP8, inv_v_scale))
    else:
        mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM)
        k = tl.load(K + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
        tl.store(KCache + dst, to_cache_value(k, KCache, KV_FP8, inv_k_scale), mask=mask)
        v = tl.load(V + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
        tl.store(VCache + dst, to_cache_value(v, VCache, KV_FP8, inv_v_scale), mask=mask)


@triton.jit
def to_cache_value(x, Cache, KV_FP8: tl.constexpr, inv_scale):
    """``x`` as ``Cache`` stores it: an fp8 cache holds ``x * inv_scale`` (the layer's 1 / k_scale or
    1 / v_scale, in float32) clamped to its finite range; other caches ignore ``inv_scale``."""
    if KV_FP8:
        x = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -448.0), 448.0)
    return x.to(Cache.dtype.element_ty)


@triton.jit
def _load_kv_tile(Cache, BlockTables, seq, kvh, toks, nmask, offs_d,
                  stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, Q, KV_FP8: tl.constexpr):
    """Gathers [TILE_N, BLOCK_D] of one kv head for token positions ``toks`` through the block table
    (an fp8 cache's values converted to the query's type: the products run in that type)."""
    blk = tl.load(BlockTables + seq * stride_bt + toks // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
    off = blk * stride_cb + (toks % BLOCK_SIZE) * stride_ct + kvh * stride_ch
    ptrs = Cache + off[:, None] + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:  # a mask constant along d keeps the loads vectorized (16 bytes)
        x = tl.load(ptrs, mask=nmask[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=nmask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if KV_FP8:
        x = x.to(Q.dtype.element_ty)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _online_softmax_step(qk, m_i, l_i, acc, v, DOT_PREC: tl.constexpr):
    """One FlashAttention update with log2-scaled scores ``qk`` [M, N] (masked entries -inf).

    Rows whose scores are all -inf so far keep m = -inf; ``m_safe`` keeps exp2 away from inf - inf.
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _log2_scores(qk, scale_log2, cap_log2, scale_over_cap):
    """q.k products -> log2-scaled scores: ``qk * scale * log2(e)``, or with a soft cap c > 0 (Gemma 2;
    ``cap_log2`` = c log2(e), ``scale_over_cap`` = scale / c) ``c tanh(scale qk / c) log2(e)``. tanh as
    1 - 2 / (e^2x + 1): exact at both ends (e^2x overflowing to inf gives 1), no tanh in triton.language."""
    s = qk * scale_log2
    if cap_log2 > 0:
        e2x = tl.math.exp2((2.0 * 1.4426950408889634) * (qk * scale_over_cap))
        s = cap_log2 * (1.0 - 2.0 / (e2x + 1.0))
    return s


@triton.jit
def _load_queries(ptrs, mask, KCache, DOT_F32: tl.constexpr, KV_FP8: tl.constexpr):
    """A decode program's query tile in the dots' operand type: the cache's (an fp8 cache's tiles come
    as the query's type instead), float32 under DOT_F32."""
    q = tl.load(ptrs, mask=mask, other=0.0)
    if not KV_FP8:
        q = q.to(KCache.dtype.element_ty)
    if DOT_F32:
        q = q.to(tl.float32)
    return q


@triton.jit
def _store_split(acc, m_i, l_i, v_scale, out_ptrs, lse_ptrs, mid_ptrs, omask, lmask, nonempty, Out,
                 NUM_SPLITS: tl.constexpr, KV_FP8: tl.constexpr):
    """A decode program's result: with one split, normalized into Out; otherwise (normalized acc,
    log2-sum-exp) for the reduce kernel (an empty split writes only its lse, -inf). Rows with no
    visible key (seq_len 0) give zeros."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:  # the values' scale (the keys' is folded into scale_log2)
        out = out * v_scale
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=omask)
    else:
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptrs, lse, mask=lmask)
        if nonempty:  # empty splits leave MidO unwritten; the reduce masks them out by their lse
            tl.store(mid_ptrs, out, mask=omask)


@triton.jit
def _decode_kernel(
    Q, KCache, VCache, BlockTables, SeqLens, QueryStartLoc, Out, MidO, MidLse, SeqOrder,
    scale_log2, v_scale,
    stride_qt, stride_qh, stride_bt, stride_cb, stride_ct, stride_ch, stride_ot, stride_oh,
    stride_mo_s, stride_mo_h, stride_mo_p, stride_ml_s, stride_ml_h,
    sliding_window, cap_log2, scale_over_cap,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIXED: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr, HAS_ORDER: tl.constexpr, EARLY_V: tl.constexpr, KV_FP8: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (NUM_SPLITS, num_kv_heads, num_seqs). All GROUP query heads of one kv head share each K/V tile.

    Programs are dispatched in grid order (splits, then heads, vary fastest): with ``HAS_ORDER`` the
    z index is a rank and ``SeqOrder[rank]`` the sequence, longest first. Long sequences then start
    first and short ones fill the tail, instead of a long one starting last and running alone
    (ragged batches lose 10-25% to that tail in a simulation of the nano workload).

    Split ``p`` covers an equal, TILE_N-aligned share of the sequence's visible keys (computed here
    from seq_lens, so the split plan adapts to the real length even under CUDA-graph replay). With
    one split the result goes straight to Out; otherwise (normalized acc, log2-sum-exp) go to
    MidO/MidLse for the reduce kernel. Sequences with q_len != 1 are skipped when MIXED.
    """
    # The step's metadata (order, lengths, start rows) was written before its first kernel, so these
    # loads may run before the PDL wait, overlapping the previous kernel (layers/pdl.py).
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.program_id(2)
    if HAS_ORDER:
        seq = tl.load(SeqOrder + seq)
    row = tl.load(QueryStartLoc + seq)
    q_end = row + 1
    if MIXED:
        q_end = tl.load(QueryStartLoc + seq + 1)
    seq_len = tl.load(SeqLens + seq)
    kv_start = seq_len * 0
    if sliding_window > 0:
        kv_start = tl.maximum(seq_len - sliding_window, 0)
    span = tl.maximum(seq_len - kv_start, 0)
    chunk = tl.cdiv(tl.cdiv(span, NUM_SPLITS), TILE_N) * TILE_N
    lo = kv_start + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    pdl_prologue(PDL)
    if q_end - row != 1:  # a prefill (MIXED) or an empty padding entry: not ours
        return

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, TILE_N)
    gmask = offs_g < GROUP
    dmask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = _load_queries(Q + row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                      gmask[:, None] & dmask[None, :], KCache, DOT_F32, KV_FP8)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t0 in range(lo, hi, TILE_N):
        toks = t0 + offs_n
        nmask = toks < hi
        k = _load_kv_tile(KCache, BlockTables, seq, kvh, toks, nmask, offs_d,
                          stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_F32, Q, KV_FP8)
        if EARLY_V:  # V's load issued before the q.k dot waits on K: less latency, more registers
            v = _load_kv_tile(VCache, BlockTables, seq, kvh, toks, nmask, offs_d,
                              stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_F32, Q, KV_FP8)
        qk = _log2_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), scale_log2, cap_log2, scale_over_cap)
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        if not EARLY_V:
            v = _load_kv_tile(VCache, BlockTables, seq, kvh, toks, nmask, offs_d,
                              stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_F32, Q, KV_FP8)
        m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc, v, DOT_PREC)

    _store_split(acc, m_i, l_i, v_scale, Out + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 MidLse + seq * stride_ml_s + heads * stride_ml_h + split,
                 MidO + seq * stride_mo_s + heads[:, None] * stride_mo_h + split * stride_mo_p + offs_d[None, :],
                 gmask[:, None] & dmask[None, :], gmask, hi > lo, Out, NUM_SPLITS, KV_FP8)


@triton.jit
def _multi_query_decode_kernel(
    Q, KCache, VCache, BlockTables, SeqLens, QueryStartLoc, Out, MidO, MidLse,
    scale_log2, v_scale,
    stride_qt, stride_qh, stride_bt, stride_cb, stride_ct, stride_ch, stride_ot, stride_oh,
    stride_mo_t, stride_mo_h, stride_mo_p, stride_ml_t, stride_ml_h,
    sliding_window, cap_log2, scale_over_cap,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, QUERIES: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, KV_FP8: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (NUM_SPLITS, num_kv_heads, num_seqs): split-KV decoding of sequences with 1..QUERIES query
    rows (a verifying step: the last token and its proposals). Row m of the [BLOCK_M] tile is query
    row m // BLOCK_G of the sequence for head m % BLOCK_G of the kv head's GROUP, so every row of
    every head of the group shares each K/V tile; row j of a sequence with q_len q and seq_len L is
    at position L - q + j and sees the keys up to it (and, with a window W, after its position - W).

    Split ``p`` covers an equal, TILE_N-aligned share of the keys the sequence's rows see, as in
    ``_decode_kernel``; partial results go to MidO/MidLse per query row (token), merged by
    ``_decode_reduce_kernel`` with BY_ROW. Sequences with no rows or more than QUERIES are skipped.
    """
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(QueryStartLoc + seq)  # step metadata: before the PDL wait
    q_len = tl.load(QueryStartLoc + seq + 1) - q_start
    seq_len = tl.load(SeqLens + seq)
    ctx = seq_len - q_len  # tokens before the first query row
    kv_start = seq_len * 0
    if sliding_window > 0:
        kv_start = tl.maximum(ctx + 1 - sliding_window, 0)
    span = tl.maximum(seq_len - kv_start, 0)
    chunk = tl.cdiv(tl.cdiv(span, NUM_SPLITS), TILE_N) * TILE_N
    lo = kv_start + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    pdl_prologue(PDL)
    if q_len < 1 or q_len > QUERIES:  # an empty padding entry, or a prefill: not ours
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, TILE_N)
    j = offs_m // BLOCK_G
    g = offs_m % BLOCK_G
    rmask = (g < GROUP) & (j < q_len)
    dmask = offs_d < HEAD_DIM
    rows = (q_start + j).to(tl.int64)
    heads = kvh * GROUP + g
    pos = ctx + j
    q = _load_queries(Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                      rmask[:, None] & dmask[None, :], KCache, DOT_F32, KV_FP8)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t0 in range(lo, hi, TILE_N):
        toks = t0 + offs_n
        nmask = toks < hi
        k = _load_kv_tile(KCache, BlockTables, seq, kvh, toks, nmask, offs_d,
                          stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_F32, Q, KV_FP8)
        qk = _log2_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), scale_log2, cap_log2, scale_over_cap)
        visible = nmask[None, :] & (toks[None, :] <= pos[:, None])
        if sliding_window > 0:
            visible = visible & (toks[None, :] > pos[:, None] - sliding_window)
        qk = tl.where(visible, qk, float("-inf"))
        v = _load_kv_tile(VCache, BlockTables, seq, kvh, toks, nmask, offs_d,
                          stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_F32, Q, KV_FP8)
        m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc, v, DOT_PREC)

    _store_split(acc, m_i, l_i, v_scale, Out + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 MidLse + rows * stride_ml_t + heads * stride_ml_h + split,
                 MidO + rows[:, None] * stride_mo_t + heads[:, None] * stride_mo_h + split * stride_mo_p + offs_d[None, :],
                 rmask[:, None] & dmask[None, :], rmask, hi > lo, Out, NUM_SPLITS, KV_FP8)


@triton.jit
def _decode_reduce_kernel(
    MidO, MidLse, QueryStartLoc, Out,
    stride_mo_s, stride_mo_h, stride_mo_p, stride_ml_s, stride_ml_h, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MIXED: tl.constexpr,
    BY_ROW: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (num_seqs, num_heads): merges the splits' partial results by their log-sum-exp weights.
    BY_ROW (``_multi_query_decode_kernel``'s): grid (query rows, num_heads), partial results per row."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    if BY_ROW:
        row = seq
        pdl_prologue(PDL)
    else:
        row = tl.load(QueryStartLoc + seq)  # step metadata: before the PDL wait
        q_end = row + 1
        if MIXED:
            q_end = tl.load(QueryStartLoc + seq + 1)
        pdl_prologue(PDL)
        if q_end - row != 1:
            return
    offs_p = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + seq * stride_ml_s + h * stride_ml_h + offs_p)
    valid = lse > float("-inf")
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(valid, tl.math.exp2(lse - m), 0.0)
    o = tl.load(MidO + seq * stride_mo_s + h * stride_mo_h + offs_p[:, None] * stride_mo_p + offs_d[None, :],
                mask=valid[:, None] & dmask[None, :], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + row.to(tl.int64) * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=dmask)


@triton.jit
def _find_seq(QueryStartLoc, num_seqs, pid, BLOCK_M: tl.constexpr):
    """Largest i with query_start_loc[i] // BLOCK_M + i <= pid (binary search; the +i gives every
    sequence at least one tile slot, so tile slots of different sequences never overlap)."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(QueryStartLoc + mid) // BLOCK_M + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs"])  # one compiled variant for any number of sequences
def _prefill_kernel(
    Q, KCache, VCache, BlockTables, SeqLens, QueryStartLoc, Out,
    scale_log2, v_scale, num_seqs,
    stride_qt, stride_qh, stride_bt, stride_cb, stride_ct, stride_ch, stride_ot, stride_oh,
    sliding_window, cap_log2, scale_over_cap,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr, SKIP_DECODES: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    KV_FP8: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (num_heads, num_tokens // BLOCK_M + num_seqs): one BLOCK_M tile of one sequence's queries
    for one head, FlashAttention-2 style over K/V gathered from the paged cache (prefix + new tokens).
    Query row j of a sequence with q_len q and seq_len L sits at position L - q + j (causal).

    Heads vary fastest in launch order, so the heads of a kv group run together and share K/V
    through L2; tiles run last-first, so the longest (latest) tiles start first and the short ones
    fill the tail."""
    h = tl.program_id(0)
    pid = tl.num_programs(1) - 1 - tl.program_id(1)
    kvh = h // GROUP
    # The binary search reads only step metadata: it may run before the PDL wait (layers/pdl.py).
    seq = _find_seq(QueryStartLoc, num_seqs, pid, BLOCK_M)
    q_start = tl.load(QueryStartLoc + seq)
    q_len = tl.load(QueryStartLoc + seq + 1) - q_start
    tile = pid - (q_start // BLOCK_M + seq)
    pdl_prologue(PDL)
    if tile * BLOCK_M >= q_len:
        return
    if SKIP_DECODES:
        if q_len == 1:
            return
    seq_len = tl.load(SeqLens + seq)
    ctx = seq_len - q_len  # tokens already in the cache before this chunk

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, TILE_N)
    mmask = offs_m < q_len
    dmask = offs_d < HEAD_DIM
    q_pos = ctx + offs_m
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    if not KV_FP8:  # (an fp8 cache's tiles come as the query's type instead)
        q = q.to(KCache.dtype.element_ty)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_pos = ctx + tile * BLOCK_M
    kv_hi = tl.minimum(first_pos + BLOCK_M, seq_len)  # one past the tile's last query position
    kv_lo = seq_len * 0
    full_hi = seq_len * 0  # keys below full_hi are visible to every row of the tile: no mask needed
    if sliding_window > 0:
        kv_lo = (tl.maximum(first_pos - sliding_window + 1, 0) // TILE_N) * TILE_N
    else:
        full_hi = (tl.minimum(first_pos + 1, seq_len) // TILE_N) * TILE_N
    for t0 in range(0, full_hi, TILE_N):
        toks = t0 + offs_n
        nmask = toks < full_hi
        k = _load_kv_tile(KCache, BlockTables, seq, kvh, toks, nmask, offs_d,
                          stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_F32, Q, KV_FP8)
        qk = _log2_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), scale_log2, cap_log2, scale_over_cap)
        v = _load_kv_tile(VCache, BlockTables, seq, kvh, toks, nmask, offs_d,
                          stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_F32, Q, KV_FP8)
        m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc, v, DOT_PREC)
    for t0 in range(tl.maximum(kv_lo, full_hi), kv_hi, TILE_N):
        toks = t0 + offs_n
        nmask = toks < kv_hi
        if sliding_window > 0:  # keys before every row's window are not read (their blocks may be freed)
            nmask = nmask & (toks > first_pos - sliding_window)
        k = _load_kv_tile(KCache, BlockTables, seq, kvh, toks, nmask, offs_d,
                          stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_F32, Q, KV_FP8)
        qk = _log2_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), scale_log2, cap_log2, scale_over_cap)
        visible = (toks[None, :] <= q_pos[:, None]) & nmask[None, :]
        if sliding_window > 0:
            visible = visible & (toks[None, :] > q_pos[:, None] - sliding_window)
        qk = tl.where(visible, qk, float("-inf"))
        v = _load_kv_tile(VCache, BlockTables, seq, kvh, toks, nmask, offs_d,
                          stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_F32, Q, KV_FP8)
        m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc, v, DOT_PREC)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:  # the values' scale (the keys' is folded into scale_log2)
        out = out * v_scale
    tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launch wrappers. Tensors: query [T, H, D]; key/value [T, KVH, D] (last dim contiguous);
# kv_cache [2, num_blocks, block_size, KVH, D]; block_tables int32 [S, max_blocks];
# seq_lens int32 [S]; query_start_loc int32 [S + 1]; out [T, H, D] (last dim contiguous).
# ----------------------------------------------------------------------------------------------


def _dot_args(query_dtype: torch.dtype, cache_dtype: torch.dtype) -> dict:
    """DOT_PREC: fp32 inputs would otherwise go through tf32 (10-bit mantissa) on the tensor cores.
    DOT_F32: the Triton interpreter multiplies bf16 dot operands as their raw uint16 bits (a bug in
    triton 3.x's interpreter), so interpreted bf16 runs upcast the operands to fp32 first.
    KV_FP8: an fp8 cache; the dot operands are then in the query's type."""
    kv_fp8 = cache_dtype == torch.float8_e4m3fn
    dtype = query_dtype if kv_fp8 else cache_dtype
    dot_f32 = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return dict(DOT_PREC="ieee" if dtype == torch.float32 or dot_f32 else "tf32", DOT_F32=dot_f32, KV_FP8=kv_fp8)


def _soft_cap_args(scale: float, logits_soft_cap: Optional[float]) -> tuple[float, float]:
    """(cap_log2, scale_over_cap) for ``_log2_scores``; (0, 0) without a cap. Runtime floats, not
    constexprs: a soft-capped model compiles no extra kernel variants (warmup stays as it is)."""
    if not logits_soft_cap:
        return 0.0, 0.0
    if logits_soft_cap < 0:
        raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
    return logits_soft_cap * LOG2E, scale / logits_soft_cap


def _fold_kv_scales(kv_cache: torch.Tensor, scale: float, k_scale: float, v_scale: float) -> tuple[float, float]:
    """(score scale, value scale) for the kernels: an fp8 cache's keys are read as cached x k_scale,
    so q.k scales by k_scale, which joins the softmax scale (and the soft cap's); its values' scale
    multiplies the output once (attention is linear in V). Other caches have no scales."""
    if kv_cache.dtype != torch.float8_e4m3fn:
        return scale, 1.0
    return scale * k_scale, v_scale


def _check_last_dim(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"the last dim must be contiguous, got strides {t.stride()}")


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Writes key/value [T, KVH, D] into ``kv_cache`` at ``slot_mapping`` (int64 [>= T]; -1 skips);
    an fp8 cache gets key / k_scale and value / v_scale (other caches ignore the scales).

    Only the first ``min(T, len(slot_mapping))`` tokens are written (one launch for K and V).
    """
    _check_last_dim(key, value, kv_cache)
    n = min(key.shape[0], slot_mapping.shape[0])
    if n == 0:
        return
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    kc, vc = kv_cache[0], kv_cache[1]
    launch(
        _reshape_and_cache_kernel, (n,), key, value, kc, vc, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), 1.0 / k_scale, 1.0 / v_scale, NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), KV_FP8=kv_cache.dtype == torch.float8_e4m3fn,
        **pdl.launch_args(key.device),
    )


def num_decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      min_tokens_per_split: int = 256, max_splits: int = 64) -> int:
    """Split count (a power of 2) for split-KV decoding.

    The most splits that keep the programs (num_seqs * num_kv_heads * splits) within about two per
    SM, but no split shorter than ``min_tokens_per_split`` of ``max_seq_len``: below that the reduce
    costs more than the parallelism buys. Depends only on host values fixed per CUDA graph.
    Measured on an H100 (``decode_attn_bench.py``, 8 kv heads, 1,000-token contexts): at 16-64
    sequences this plan (2, 1, 1 splits) is 10-12% faster per layer than the earlier "four programs
    per SM" (8, 4, 2), and at 1-8 sequences within 1% of the best split count.
    """
    want = 2 * num_sms // max(num_seqs * num_kv_heads, 1)
    by_len = -(-max(max_seq_len, 1) // min_tokens_per_split)
    s = max(1, min(want, by_len, max_splits))
    return 1 << (s.bit_length() - 1)  # the power of 2 at or below


def paged_attention_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor,
                           num_seqs: int, scale: float, sliding_window: Optional[int], num_splits: int,
                           mixed: bool, tile_n: Optional[int] = None, num_warps: Optional[int] = None,
                           seq_order: Optional[torch.Tensor] = None, num_stages: int = 3,
                           early_v: bool = False, logits_soft_cap: Optional[float] = None,
                           k_scale: float = 1.0, v_scale: float = 1.0, queries: int = 1) -> None:
    """Attention for the sequences with q_len == 1 (every sequence unless ``mixed``), into ``out``.
    ``k_scale`` / ``v_scale``: an fp8 cache's scales (keys and values are read as cached x scale).
    ``queries`` > 1: the sequences with 1 to ``queries`` query rows instead, causal among them
    (``_multi_query_decode_kernel``: a verifying step; ``mixed``, ``seq_order`` and ``early_v``
    do not apply).

    ``num_splits`` (a power of 2): partitions of each context, merged by a reduce kernel when > 1.
    ``seq_order``: int32 [>= num_seqs], a permutation of the sequences in the order their programs
    should start (longest first); None: index order. It changes only the schedule, never the result.
    """
    _check_last_dim(query, kv_cache, out)
    scale, v_scale = _fold_kv_scales(kv_cache, scale, k_scale, v_scale)
    num_heads, head_dim = query.shape[1], query.shape[2]
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    tile_n = tile_n or (64 if block_d <= 128 else 32)
    kc, vc = kv_cache[0], kv_cache[1]
    if queries > 1:
        _multi_query_decode(query, kc, vc, block_tables, seq_lens, query_start_loc, out, num_seqs, scale, v_scale,
                            sliding_window, num_splits, group, block_d, block_size, tile_n, queries, num_warps,
                            num_stages, logits_soft_cap)
        return
    if num_splits > 1:
        mid_o = torch.empty(num_seqs, num_heads, num_splits, block_d, dtype=torch.float32, device=query.device)
        mid_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
    else:
        mid_o = mid_lse = out  # unused
    launch(
        _decode_kernel, (num_splits, num_kv_heads, num_seqs),
        query, kc, vc, block_tables, seq_lens, query_start_loc, out, mid_o, mid_lse,
        seq_order if seq_order is not None else seq_lens,
        scale * LOG2E, v_scale,
        query.stride(0), query.stride(1), block_tables.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
        out.stride(0), out.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        sliding_window or 0, *_soft_cap_args(scale, logits_soft_cap),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        TILE_N=tile_n, NUM_SPLITS=num_splits, MIXED=mixed, **_dot_args(query.dtype, kv_cache.dtype),
        HAS_ORDER=seq_order is not None, EARLY_V=early_v, num_warps=num_warps or 4, num_stages=num_stages,
        **pdl.launch_args(query.device),
    )
    if num_splits > 1:
        launch(
            _decode_reduce_kernel, (num_seqs, num_heads), mid_o, mid_lse, query_start_loc, out,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, BLOCK_D=block_d, MIXED=mixed, BY_ROW=False, num_warps=4,
            **pdl.launch_args(query.device),
        )


def _multi_query_decode(query: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor, num_seqs: int,
                        scale: float, v_scale: float, sliding_window: Optional[int], num_splits: int, group: int,
                        block_d: int, block_size: int, tile_n: int, queries: int, num_warps: Optional[int],
                        num_stages: int, logits_soft_cap: Optional[float]) -> None:
    """``paged_attention_decode`` with ``queries`` > 1 (its scales already folded)."""
    num_tokens, num_heads, head_dim = query.shape
    block_q = triton.next_power_of_2(queries)
    block_g = triton.next_power_of_2(group)
    block_m = max(16, block_q * block_g)
    if num_splits > 1:  # partial results per query row
        mid_o = torch.empty(num_tokens, num_heads, num_splits, block_d, dtype=torch.float32, device=query.device)
        # -inf: a row no program writes (padding past the sequences) merges to zeros
        mid_lse = torch.full((num_tokens, num_heads, num_splits), float("-inf"), dtype=torch.float32,
                             device=query.device)
    else:
        mid_o = mid_lse = out  # unused
    launch(
        _multi_query_decode_kernel, (num_splits, kc.shape[2], num_seqs),
        query, kc, vc, block_tables, seq_lens, query_start_loc, out, mid_o, mid_lse,
        scale * LOG2E, v_scale,
        query.stride(0), query.stride(1), block_tables.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
        out.stride(0), out.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        sliding_window or 0, *_soft_cap_args(scale, logits_soft_cap),
        GROUP=group, BLOCK_G=block_g, QUERIES=queries, BLOCK_M=block_m, HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_SIZE=block_size, TILE_N=tile_n, NUM_SPLITS=num_splits,
        **_dot_args(query.dtype, kc.dtype), num_warps=num_warps or (8 if block_m >= 128 else 4), num_stages=num_stages,
        **pdl.launch_args(query.device),
    )
    if num_splits > 1:
        launch(
            _decode_reduce_kernel, (num_tokens, num_heads), mid_o, mid_lse, query_start_loc, out,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, BLOCK_D=block_d, MIXED=False, BY_ROW=True, num_warps=4,
            **pdl.launch_args(query.device),
        )


def paged_attention_prefill(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor,
                            num_seqs: int, scale: float, sliding_window: Optional[int], skip_decodes: bool,
                            block_m: Optional[int] = None, tile_n: Optional[int] = None,
                            num_warps: Optional[int] = None, num_stages: int = 2,
                            logits_soft_cap: Optional[float] = None, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> None:
    """Causal attention for every query row of every sequence (those with q_len == 1 too unless
    ``skip_decodes``), reading K/V (cached prefix and this step's tokens) from the paged cache
    (an fp8 cache's as cached x ``k_scale`` / ``v_scale``)."""
    _check_last_dim(query, kv_cache, out)
    scale, v_scale = _fold_kv_scales(kv_cache, scale, k_scale, v_scale)
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    block_d = max(16, triton.next_power_of_2(head_dim))
    # 64 queries x 64 keys per step, 4 warps, 2 stages: the fastest of 24 configs on an H100 for a
    # mixed step's 8,192 prompt rows at head_dim 128 (tests/benchmarks/prefill_attn_bench.py): 1.39x
    # (Qwen3-0.6B heads) and 1.39x (Llama-3.1-8B) the 128 x 64, 8-warp config used before.
    if block_m is None:
        block_m = 64
    if tile_n is None:
        tile_n = 64 if block_d <= 128 else 32
    kc, vc = kv_cache[0], kv_cache[1]
    grid = (num_heads, num_tokens // block_m + num_seqs)
    launch(
        _prefill_kernel, grid, query, kc, vc, block_tables, seq_lens, query_start_loc, out,
        scale * LOG2E, v_scale, num_seqs,
        query.stride(0), query.stride(1), block_tables.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
        out.stride(0), out.stride(1), sliding_window or 0, *_soft_cap_args(scale, logits_soft_cap),
        GROUP=num_heads // num_kv_heads, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        TILE_N=tile_n, SKIP_DECODES=skip_decodes, **_dot_args(query.dtype, kv_cache.dtype),
        num_warps=num_warps or (8 if block_m >= 128 else 4), num_stages=num_stages, **pdl.launch_args(query.device),
    )
