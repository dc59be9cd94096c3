"""The fused-MoE path (expert alignment, the grouped-GEMM Triton kernel with the top-k weights applied
in the kernel, and the torch path) against a float64 loop over experts, tokens and slots. On CPU
the kernel runs under the Triton interpreter, at small shapes."""

from __future__ import annotations

import pytest
import torch

from vllm_engine.layers import fused_moe as M

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def reference(x, w13, w2, weights, ids) -> torch.Tensor:
    """float64: for every token and slot, its expert's SwiGLU MLP scaled by the slot's weight."""
    x, w13, w2, weights = x.double().cpu(), w13.double().cpu(), w2.double().cpu(), weights.double().cpu()
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate_up = w13[e] @ x[t]
            out[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]))
    return out


def make(num_tokens, num_experts, top_k, hidden, inter, dtype, seed=0, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if skew:  # most tokens to expert 1: one long run, several experts with none
        logits[:, 1] += 4.0
    weights, ids = M.select_experts(logits, top_k, renormalize=True)
    return [t.to(DEVICE) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


def _check(got, want, dtype):
    err = ((got.double().cpu() - want).abs() - TOL[dtype] * want.abs()).max().item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter,dtype,skew,config", [
    (1, 8, 2, 64, 32, torch.float32, False, None),           # a decode token: Mixtral's routing
    (13, 8, 2, 48, 40, torch.float32, True, (16, 16, 16, 4, 1)),  # ragged runs, masked K/N edges
    (37, 16, 4, 32, 24, torch.float32, False, (16, 32, 16, 4, 1)),
    (9, 8, 2, 64, 32, torch.bfloat16, False, (16, 32, 32, 4, 1)),
])
def test_triton_fused_moe_matches_a_float64_expert_loop(num_tokens, num_experts, top_k, hidden, inter, dtype, skew,
                                                         config):
    x, w13, w2, weights, ids = make(num_tokens, num_experts, top_k, hidden, inter, dtype, skew=skew)
    got = M.triton_fused_moe(x, w13, w2, weights, ids, config=config)
    assert got.shape == x.shape and got.dtype == dtype
    _check(got, reference(x, w13, w2, weights, ids), dtype)


def test_an_empty_batch_gives_an_empty_output():
    x, w13, w2, weights, ids = make(0, 8, 2, 32, 16, torch.float32)
    for fn in (M.triton_fused_moe, M.torch_fused_moe):
        assert fn(x, w13, w2, weights, ids).shape == (0, 32)


def test_torch_path_matches_the_reference():
    x, w13, w2, weights, ids = make(11, 8, 2, 32, 16, torch.float32, seed=3, skew=True)
    _check(M.torch_fused_moe(x, w13, w2, weights, ids), reference(x, w13, w2, weights, ids), torch.float32)


def test_align_by_expert_groups_pairs_in_padded_runs():
    """Every pair appears once, in a tile of its own expert; padding fills the rest of each run."""
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [3, 0]])
    sorted_ids, block_expert, num_padded = M.align_by_expert(ids, num_experts=5, block_m=4)
    flat = ids.flatten()
    n = int(num_padded)
    assert n == 4 + 4 + 4 + 8  # expert 0: 3 pairs, 1: 1, 2: 1, 3: 5; expert 4: none
    real = sorted_ids[:n][sorted_ids[:n] < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))
    for tile in range(n // 4):
        pairs = sorted_ids[tile * 4: tile * 4 + 4]
        pairs = pairs[pairs < flat.numel()]
        assert len(pairs) > 0 and (flat[pairs.long()] == block_expert[tile]).all()
    assert (sorted_ids[n:] == flat.numel()).all()
    assert sorted_ids.numel() == 4 * (3 + 5)  # cdiv(10 pairs, 4) + min(5 experts, 10 pairs) tiles


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [(1, 8, 2, 16), (37, 128, 8, 16), (200, 64, 6, 64),
                                                                   (9, 256, 8, 32), (5, 3, 1, 16)])
def test_the_align_kernel_gives_the_torch_alignment(num_tokens, num_experts, top_k, block_m):
    """One launch (the decode path) and the torch ops (prefill) agree bit for bit, skewed routing too."""
    g = torch.Generator().manual_seed(num_tokens)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    logits[:, 0] += 2.0
    ids = torch.topk(logits, top_k, dim=-1).indices.to(DEVICE)
    got = M.triton_align_by_expert(ids, num_experts, block_m)
    want = M.torch_align_by_expert(ids, num_experts, block_m)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b.cpu())


def test_capacity_holds_the_worst_routing():
    """Every pair alone on its expert (the most partial tiles) still fits."""
    ids = torch.arange(12).view(6, 2)
    sorted_ids, _, num_padded = M.align_by_expert(ids, num_experts=12, block_m=16)
    assert int(num_padded) == 12 * 16 == sorted_ids.numel() - 16


def test_select_experts_softmax_top_k_and_renormalize():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    w, ids = M.select_experts(logits, 2, renormalize=False)
    p = torch.softmax(logits, -1)[0]
    assert ids.tolist() == [[3, 2]] and torch.allclose(w[0], p[[3, 2]])
    w, _ = M.select_experts(logits, 2, renormalize=True)
    assert torch.allclose(w.sum(-1), torch.ones(1))


def test_experts_split_across_ranks_sum_to_the_whole():
    """Each rank's FusedMoE holds its slice of every expert's intermediate size; the ranks' partial
    outputs (reduce_results off: summed here) give the one-rank output."""
    from vllm_engine.distributed import override_parallel_state

    x, w13, w2, _, _ = make(7, 4, 2, 16, 8, torch.float32, seed=5)
    logits = torch.randn(7, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def build(rank, size):
        with override_parallel_state(rank, size, 0, 1):
            moe = M.FusedMoE(4, 2, 16, 8, True, torch.float32, reduce_results=False).to(DEVICE)
        for e in range(4):
            moe.weight_loader(moe.w13_weight, w13[e, :8], (e, "gate"))
            moe.weight_loader(moe.w13_weight, w13[e, 8:], (e, "up"))
            moe.weight_loader(moe.w2_weight, w2[e], (e, "down"))
        return moe

    whole = build(0, 1)(x, logits)
    parts = sum(build(r, 2)(x, logits) for r in range(2))
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
    moe = build(0, 1)
    with pytest.raises(ValueError, match=r"has shape \(3, 3\), expected \(8, 16\)"):
        moe.weight_loader(moe.w13_weight, torch.zeros(3, 3), (0, "gate"))


COMPILE_SM90 = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from vllm_engine.layers import fused_moe as M
from vllm_engine.layers.fused_moe import _fused_moe_kernel as k
types = dict(A="*bf16", B="*bf16", C="*bf16", TopkWeights="*fp32", SortedIds="*i32", BlockExpert="*i32",
             NumPadded="*i32", N="i32", K="i32", num_pairs="i32", stride_am="i32", stride_be="i64", stride_bn="i32",
             stride_bk="i32", stride_cm="i32")
for bm, bn, bk, warps, stages, mul in ((16, 64, 64, 4, 4, False), (64, 128, 64, 8, 3, True)):
    consts = dict(TOP_K=2, MUL_WEIGHT=mul, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PREC="tf32", DOT_F32=False, PDL=True)
    sig = {n: "constexpr" if n in consts else types[n] for n in k.arg_names}
    out = triton.compile(ASTSource(k, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages))
    print(bm, "wgmma" in out.asm["ptx"], "griddepcontrol.wait" in out.asm["ptx"])
a = M._align_kernel
for experts in (8, 128, 256):
    block_e = max(16, triton.next_power_of_2(experts))
    consts = dict(NUM_EXPERTS=experts, BLOCK_E=block_e, BLOCK_M=16, BLOCK_P=max(16, 4096 // block_e), BLOCK_T=64,
                  PDL=True)
    sig = {n: "constexpr" if n in consts else dict(Ids="*i64", SortedIds="*i32", BlockExpert="*i32",
                                                   NumPadded="*i32", num_pairs="i32", capacity="i32")[n]
           for n in a.arg_names}
    out = triton.compile(ASTSource(a, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=4, num_stages=1))
    print("align", experts, "griddepcontrol.wait" in out.asm["ptx"])
"""


def test_the_kernel_compiles_for_sm90():
    """Compiled for the H100 with triton's bundled ptxas, no GPU needed (typing errors the interpreter
    lets through); the prefill-sized tile uses wgmma, and the kernels wait under PDL; the alignment
    kernel at 8, 128 and 256 experts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SM90], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["16", "False", "True", "64", "True", "True", "align", "8", "True", "align", "128",
                                   "True", "align", "256", "True"], proc.stdout


def test_the_gpu_benchmark_script_runs_on_the_cpu():
    """tests/benchmarks/moe_bench.py (the H200 comparison against a cuBLAS loop) in its CPU smoke mode:
    both paths agree at reduced Mixtral and Qwen3-MoE shapes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import moe_bench

    for model in ("mixtral-8x7b", "qwen3-30b-a3b"):
        assert moe_bench.main(["--smoke", "--model", model, "--batch-sizes", "1", "6"]) == 0
