"""Attention over a latent KV cache (DeepSeek's multi-head latent attention, absorbed form).

Cache layout, one tensor per layer::

    latent_cache: [num_blocks, block_size, latent_dim + rope_dim]

one vector [c | k_pe] per token (the compressed latent and the rotary key shared by all heads): it is
the key of every head, and its first ``latent_dim`` entries are the value. A block holds
``block_size * (latent_dim + rope_dim)`` elements: for DeepSeek-V2 576 per token and layer, against
2 * 576 in the K/V layout. Slots, block tables and the flat varlen batch are those of
attention/backend.py.

``mla_attention(q [T, H, latent_dim + rope_dim], latent_cache, metadata, scale, latent_dim)`` ->
[T, H, latent_dim]: softmax(scale q . [c | k_pe]) summed over c, causal within each sequence. The
torch version is the reference (and the CPU path); the Triton kernel takes every query row, prefill
chunks and decodes alike, one program per (a few consecutive query rows of a sequence, block of heads).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from vllm_engine.attention.backend import AttentionMetadata

try:
    import triton
    import triton.language as tl

    from vllm_engine.attention.triton_kernels import _find_seq
    from vllm_engine.layers import pdl
    from vllm_engine.layers.parallel_compile import launch
    from vllm_engine.layers.pdl import pdl_prologue
except ImportError:  # CPU-only installs: the torch version serves every call
    triton = None


def write_latent(entries: torch.Tensor, latent_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores entries [T, D] at their slots of latent_cache [blocks, block_size, D]; slot -1 (padding)
    and rows past ``slot_mapping`` are skipped. A Triton kernel on CUDA (no host sync: CUDA graphs)."""
    n = min(entries.shape[0], slot_mapping.shape[0])
    if n == 0:
        return
    if triton is not None and (entries.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        dim = latent_cache.shape[-1]
        launch(_write_latent_kernel, (n,),
               entries, latent_cache, slot_mapping, entries.stride(0), latent_cache.stride(0),
                                   latent_cache.stride(1), D=dim, BLOCK=triton.next_power_of_2(dim),
                                   BLOCK_SIZE=latent_cache.shape[1], **pdl.launch_args(entries.device))
        return
    slots = slot_mapping[:n]
    valid = slots >= 0
    latent_cache.view(-1, latent_cache.shape[-1]).index_copy_(0, slots[valid], entries[:n][valid].to(latent_cache.dtype))


def torch_mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                        latent_dim: int) -> torch.Tensor:
    """The reference: a loop over the sequences, float32 inside."""
    qsl = metadata.query_start_loc_cpu or metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens_cpu or metadata.seq_lens.tolist()
    block_size = latent_cache.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], latent_dim, dtype=q.dtype, device=q.device)
    for i in range(metadata.num_seqs):
        qs, qe, seq_len = qsl[i], qsl[i + 1], seq_lens[i]
        if qe == qs:
            continue
        blocks = metadata.block_tables[i][: -(-seq_len // block_size)].long()
        kv = latent_cache[blocks].flatten(0, 1)[:seq_len].float()  # [L, D]
        scores = torch.einsum("thd,ld->htl", q[qs:qe].float(), kv) * scale
        q_pos = torch.arange(seq_len - (qe - qs), seq_len, device=q.device)[:, None]
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
        p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out[qs:qe] = torch.einsum("htl,ld->thd", p, kv[:, :latent_dim]).to(out.dtype)
    return out


if triton is not None:

    @triton.jit
    def _write_latent_kernel(E, Cache, Slots, stride_e, stride_cb, stride_ct, D: tl.constexpr, BLOCK: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr):
        """One program per new token: its [D] vector into its slot (slot < 0: nothing)."""
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(Slots + t).to(tl.int64)
        pdl_prologue(PDL)
        if slot < 0:
            return
        offs = tl.arange(0, BLOCK)
        x = tl.load(E + t * stride_e + offs, mask=offs < D)
        dst = Cache + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + offs
        tl.store(dst, x.to(Cache.dtype.element_ty), mask=offs < D)

    @triton.jit(do_not_specialize=["num_seqs"])
    def _mla_kernel(Q, Cache, BlockTables, SeqLens, QueryStartLoc, Out, scale_log2, num_seqs,
                    stride_qt, stride_qh, stride_cb, stride_ct, stride_bt, stride_ot, stride_oh,
                    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, LATENT: tl.constexpr,
                    ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TILE_N: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr):
        """Grid (num_tokens // BLOCK_T + num_seqs, cdiv(NUM_HEADS, BLOCK_H)): BLOCK_T consecutive query
        rows of one sequence (tile slots as the prefill kernel's: ``_find_seq``) times BLOCK_H heads, as
        BLOCK_T * BLOCK_H rows sharing each tile of cached vectors, causal per row, FlashAttention-style
        in log2 units. Decode-only steps use BLOCK_T = 1."""
        pid = tl.program_id(0)
        h0 = tl.program_id(1) * BLOCK_H
        seq = _find_seq(QueryStartLoc, num_seqs, pid, BLOCK_T)
        q_start = tl.load(QueryStartLoc + seq)
        q_len = tl.load(QueryStartLoc + seq + 1) - q_start
        tile = pid - (q_start // BLOCK_T + seq)
        seq_len = tl.load(SeqLens + seq)
        pdl_prologue(PDL)
        if tile * BLOCK_T >= q_len:
            return
        rows = tl.arange(0, BLOCK_T * BLOCK_H)
        tok = tile * BLOCK_T + rows // BLOCK_H  # index in the sequence's query rows
        heads = h0 + rows % BLOCK_H
        row_mask = (tok < q_len) & (heads < NUM_HEADS)
        pos = seq_len - q_len + tok
        last = seq_len - q_len + tl.minimum(tile * BLOCK_T + BLOCK_T, q_len) - 1  # the tile's last position
        offs_l = tl.arange(0, BLOCK_L)
        offs_r = tl.arange(0, BLOCK_R)
        lmask = offs_l < LATENT
        rmask = offs_r < ROPE
        q_row = Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh
        q_c = tl.load(q_row + offs_l[None, :], mask=row_mask[:, None] & lmask[None, :], other=0.0)
        q_r = tl.load(q_row + LATENT + offs_r[None, :], mask=row_mask[:, None] & rmask[None, :], other=0.0)
        if DOT_F32:
            q_c = q_c.to(tl.float32)
            q_r = q_r.to(tl.float32)
        m_i = tl.full([BLOCK_T * BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_T * BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_T * BLOCK_H, BLOCK_L], tl.float32)
        for t0 in range(0, last + 1, TILE_N):
            toks = t0 + tl.arange(0, TILE_N)
            nmask = toks <= last
            blk = tl.load(BlockTables + seq * stride_bt + toks // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
            base = Cache + blk * stride_cb + (toks % BLOCK_SIZE) * stride_ct
            c = tl.load(base[:, None] + offs_l[None, :], mask=nmask[:, None] & lmask[None, :], other=0.0)
            r = tl.load(base[:, None] + LATENT + offs_r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
            if DOT_F32:
                c = c.to(tl.float32)
                r = r.to(tl.float32)
            qk = tl.dot(q_c, tl.trans(c), input_precision=DOT_PREC)
            qk = tl.dot(q_r, tl.trans(r), qk, input_precision=DOT_PREC) * scale_log2
            qk = tl.where((toks[None, :] <= pos[:, None]) & nmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: key 0 is visible to every row in the first tile
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PREC)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + (q_start + tok).to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh
                 + offs_l[None, :], out.to(Out.dtype.element_ty), mask=row_mask[:, None] & lmask[None, :])


def triton_mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                         latent_dim: int, block_h: int = 16, tile_n: Optional[int] = None,
                         prefill_block_t: int = 2) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1); same contract as the torch one.
    ``prefill_block_t``: query rows per program when the step has prefill chunks (they share each
    tile of cached vectors: fewer reads); decode-only steps take one."""
    num_tokens, num_heads, dim = q.shape
    out = torch.zeros(num_tokens, num_heads, latent_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or metadata.num_seqs == 0:
        return out
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    dot_f32 = q.dtype == torch.bfloat16 and interp  # the interpreter's bf16 dot is wrong
    block_l = max(16, triton.next_power_of_2(latent_dim))
    block_t = 1 if metadata.max_query_len <= 1 else prefill_block_t  # decodes: one row per sequence
    launch(
        _mla_kernel, (num_tokens // block_t + metadata.num_seqs, triton.cdiv(num_heads, block_h)),
        q, latent_cache, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc, out,
        scale * 1.4426950408889634, metadata.num_seqs,
        q.stride(0), q.stride(1), latent_cache.stride(0), latent_cache.stride(1), metadata.block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, BLOCK_H=block_h, BLOCK_T=block_t, LATENT=latent_dim, ROPE=dim - latent_dim,
        BLOCK_L=block_l, BLOCK_R=max(16, triton.next_power_of_2(dim - latent_dim)), BLOCK_SIZE=latent_cache.shape[1],
        TILE_N=tile_n or (32 if block_l <= 512 else 16),
        DOT_PREC="ieee" if q.dtype == torch.float32 or dot_f32 else "tf32", DOT_F32=dot_f32,
        num_warps=4 if block_t == 1 else 8, num_stages=2, **pdl.launch_args(q.device))
    return out


def mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                  latent_dim: int, use_triton: bool) -> torch.Tensor:
    """Triton when asked and usable (a CUDA tensor, or the interpreter), the torch reference otherwise."""
    if use_triton and triton is not None and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return triton_mla_attention(q, latent_cache, metadata, scale, latent_dim)
    return torch_mla_attention(q, latent_cache, metadata, scale, latent_dim)
