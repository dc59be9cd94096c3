"""Latent attention over the [latent | rope] cache (attention/mla.py): the Triton kernel (under the
interpreter on CPU) and the torch reference against float64, on ragged batches of whole prompts,
prefill chunks on cached prefixes and decodes; the latent write skips padding slots."""

from __future__ import annotations

import pytest
import torch

from vllm_engine.attention import mla
from vllm_engine.attention.backend import AttentionMetadata

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make(specs, block_size, heads, latent, rope, dtype, seed=0):
    """(q, latent_cache with every position written, metadata, per-sequence float64 vectors)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in specs]
    n_blocks = [-(-n // block_size) for n in seq_lens]
    cache = torch.randn(sum(n_blocks) + 2, block_size, latent + rope, generator=g).to(dtype)
    perm = torch.randperm(cache.shape[0], generator=g).tolist()
    tables = torch.zeros(len(specs), max(n_blocks), dtype=torch.int32)
    vectors = []
    for i, n in enumerate(seq_lens):
        blocks = [perm.pop() for _ in range(n_blocks[i])]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        v = torch.randn(n, latent + rope, generator=g).to(dtype)
        for p in range(n):
            cache[blocks[p // block_size], p % block_size] = v[p]
        vectors.append(v.double())
    qsl = [0]
    for _, q in specs:
        qsl.append(qsl[-1] + q)
    q = torch.randn(qsl[-1] + 1, heads, latent + rope, generator=g).to(dtype)  # + one padding row
    meta = AttentionMetadata(num_actual_tokens=qsl[-1], num_seqs=len(specs),
                             query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                             block_tables=tables.to(DEVICE), slot_mapping=torch.zeros(0, dtype=torch.int64),
                             max_query_len=max(q for _, q in specs), max_seq_len=max(seq_lens),
                             query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    return q.to(DEVICE), cache.to(DEVICE), meta, vectors


def reference(q, meta, vectors, scale, latent):
    q = q.double().cpu()
    out = torch.zeros(q.shape[0], q.shape[1], latent, dtype=torch.float64)
    qsl = meta.query_start_loc_cpu
    for i, v in enumerate(vectors):
        qs, qe, n = qsl[i], qsl[i + 1], v.shape[0]
        s = torch.einsum("thd,ld->htl", q[qs:qe], v) * scale
        mask = torch.arange(n)[None, :] <= torch.arange(n - (qe - qs), n)[:, None]
        out[qs:qe] = torch.einsum("htl,ld->thd", torch.softmax(s.masked_fill(~mask, float("-inf")), -1), v[:, :latent])
    return out


@pytest.mark.parametrize("dtype,heads,latent,rope,block_size", [
    (torch.float32, 4, 32, 8, 4), (torch.float32, 20, 40, 16, 16), (torch.bfloat16, 16, 64, 16, 8)])
@pytest.mark.parametrize("impl", ["triton", "triton_t4", "torch"])
def test_mla_attention_matches_float64(dtype, heads, latent, rope, block_size, impl):
    """triton: 2 query rows per program (the default), triton_t4: 4 (a tile past a chunk's end too)."""
    specs = [(0, 13), (20, 6), (37, 1), (0, 1), (9, 1)]
    q, cache, meta, vectors = make(specs, block_size, heads, latent, rope, dtype)
    scale = 0.3
    if impl == "torch":
        got = mla.torch_mla_attention(q, cache, meta, scale, latent).double().cpu()
    else:
        got = mla.triton_mla_attention(q, cache, meta, scale, latent, prefill_block_t=4 if impl == "triton_t4" else 2)
        got = got.double().cpu()
    want = reference(q, meta, vectors, scale, latent)
    n = meta.num_actual_tokens
    assert ((got[:n] - want[:n]).abs() - TOL[dtype] * want[:n].abs()).max().item() < TOL[dtype]
    assert (got[n:] == 0).all()


def test_decode_only_steps():
    q, cache, meta, vectors = make([(30, 1), (0, 1), (7, 1)], 8, 16, 32, 16, torch.float32, seed=2)
    got = mla.triton_mla_attention(q, cache, meta, 0.25, 32).double().cpu()
    want = reference(q, meta, vectors, 0.25, 32)
    assert (got[:3] - want[:3]).abs().max().item() < TOL[torch.float32] and (got[3:] == 0).all()


def test_write_latent_skips_padding_slots():
    cache = torch.zeros(3, 4, 6, device=DEVICE)
    entries = torch.arange(18, dtype=torch.float32, device=DEVICE).view(3, 6)
    mla.write_latent(entries, cache, torch.tensor([5, -1, 0], device=DEVICE))
    flat = cache.view(-1, 6).cpu()
    assert torch.equal(flat[5], entries[0].cpu()) and torch.equal(flat[0], entries[2].cpu())
    assert flat.abs().sum() == entries[0].sum() + entries[2].sum()


COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm_engine.attention import mla
types = dict(Q="*bf16", Cache="*bf16", BlockTables="*i32", SeqLens="*i32", QueryStartLoc="*i32", Out="*bf16",
             scale_log2="fp32", num_seqs="i32", stride_qt="i32", stride_qh="i32", stride_cb="i64", stride_ct="i32",
             stride_bt="i32", stride_ot="i32", stride_oh="i32", E="*bf16", Slots="*i64", stride_e="i32")
def build(k, consts, stages):
    sig = {n: "constexpr" if n in consts else types[n] for n in k.arg_names}
    warps = 8 if consts.get("BLOCK_T", 1) > 1 else 4
    out = triton.compile(ASTSource(k, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages))
    print(k.__name__, out.metadata.shared <= 227 * 1024, "griddepcontrol.wait" in out.asm["ptx"])
for block_t in (1, 2):
    build(mla._mla_kernel, dict(NUM_HEADS=16, BLOCK_H=16, BLOCK_T=block_t, LATENT=512, ROPE=64, BLOCK_L=512,
                                BLOCK_R=64, BLOCK_SIZE=16, TILE_N=32, DOT_PREC="tf32", DOT_F32=False, PDL=True), 2)
build(mla._write_latent_kernel, dict(D=576, BLOCK=1024, BLOCK_SIZE=16, PDL=True), 1)
"""


def test_the_kernels_compile_for_sm90():
    """DeepSeek-V2's shapes (512 + 64, 16 heads) for the H100/H200, no GPU needed: within shared memory,
    waiting under PDL."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SM90], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["_mla_kernel", "True", "True"] * 2 + ["_write_latent_kernel", "True", "True"], \
        proc.stdout
