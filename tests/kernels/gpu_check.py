"""GPU check of the Triton kernels at real model shapes: accuracy, timings, achieved bandwidth.

    PYTHONPATH=. python tests/kernels/gpu_check.py --out $OUT/kernels.json      (H100, < 4 minutes)
    PYTHONPATH=. python tests/kernels/gpu_check.py --smoke                      (CPU interpreter, tiny)

Sections (a table is printed as results come, the JSON written at the end):
  * decode: batches of 1..256 decodes, contexts up to 32K, Qwen3-0.6B (16 q / 8 kv heads, d 128)
    and Llama-8B (32 / 8, d 128) in bf16; max relative error vs the torch reference computed in
    fp32; kernel time (CUDA-graph replay median: also proves the decode path is capturable) and
    the achieved bandwidth (K/V bytes read / time) against a device-to-device copy's bandwidth.
  * decode_sweep: tile size / warps / split count around the default plan for the two targets.
  * prefill: whole prompts, chunks on a cached prefix, and mixed prefill+decode batches (eager
    timing of the whole backend call, as the engine runs them), TFLOP/s vs torch SDPA.
  * fused: rms_norm, fused_add_rms_norm, silu_and_mul vs torch eager vs torch.compile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from vllm_engine.attention import triton_kernels as K  # noqa: E402
from vllm_engine.attention.backend import AttentionMetadata  # noqa: E402
from vllm_engine.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from vllm_engine.attention.triton_attn import TritonAttentionBackend  # noqa: E402

MODELS = {
    "qwen3-0.6b": dict(num_heads=16, num_kv_heads=8, head_dim=128, hidden=1024, inter=3072),
    "llama-8b": dict(num_heads=32, num_kv_heads=8, head_dim=128, hidden=4096, inter=14336),
}
DECODE_CASES = [(1, 1024), (1, 8192), (1, 32768), (4, 16384), (16, 4096), (64, 2048), (128, 1024),
                (256, 512), (256, 1024), (256, 2048)]
PREFILL_CASES = {  # name -> list of (cached prefix, query length)
    "prompt_2048": [(0, 2048)],
    "prompts_4x512": [(0, 512)] * 4,
    "chunks_on_prefix": [(1536, 512), (3072, 1024)],
    "mixed_2chunks_64dec": [(0, 512), (1024, 256)] + [(1024, 1)] * 64,
}
BLOCK_SIZE = 16
if SMOKE:
    MODELS = {"tiny": dict(num_heads=4, num_kv_heads=2, head_dim=32, hidden=64, inter=96)}
    DECODE_CASES = [(3, 40)]
    PREFILL_CASES = {"mixed": [(0, 20), (9, 7), (30, 1)]}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.time() + seconds

    def left(self) -> bool:
        return time.time() < self.end


def bench(fn: Callable[[], Any], graph: bool) -> float:
    """Median time in microseconds (CUDA-graph replay when ``graph``); one timed call on CPU."""
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    import triton.testing as tt

    fn()  # compile outside the timed region / capture
    torch.cuda.synchronize()
    if graph:
        return tt.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3
    return tt.do_bench(fn, warmup=5, rep=40, return_mode="median") * 1e3


def copy_bandwidth(device: str) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write): the practical memory roof."""
    if SMOKE:
        return float("nan")
    a = torch.empty(2**29, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), graph=False)
    return 2 * a.numel() * 2 / t / 1e3


def build_batch(specs: list[tuple[int, int]], m: dict, dtype: torch.dtype, device: str, seed: int = 0,
                max_seq_len: Optional[int] = None):
    """Random q/k/v for the new tokens, a cache holding random prefixes, blocks in random order."""
    torch.manual_seed(seed)
    H, KVH, D = m["num_heads"], m["num_kv_heads"], m["head_dim"]
    ctx = torch.tensor([c for c, _ in specs])
    q_lens = torch.tensor([q for _, q in specs])
    seq_lens = ctx + q_lens
    n_blocks = (seq_lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = int(n_blocks.sum()) + 1
    perm = torch.randperm(num_blocks)
    offsets = torch.cumsum(n_blocks, 0) - n_blocks
    width = int(n_blocks.max())
    j = torch.arange(width)
    bt = torch.where(j[None] < n_blocks[:, None], perm[(offsets[:, None] + j[None]).clamp(max=num_blocks - 1)], 0)
    seq_of_tok = torch.repeat_interleave(torch.arange(len(specs)), q_lens)
    qsl = torch.zeros(len(specs) + 1, dtype=torch.long)
    qsl[1:] = torch.cumsum(q_lens, 0)
    pos = torch.arange(int(qsl[-1])) - qsl[seq_of_tok] + ctx[seq_of_tok]
    slots = bt[seq_of_tok, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    T = int(qsl[-1])
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, KVH, D, device=device, dtype=dtype)
    meta = AttentionMetadata(
        num_actual_tokens=T, num_seqs=len(specs),
        query_start_loc=qsl.to(torch.int32).to(device), seq_lens=seq_lens.to(torch.int32).to(device),
        block_tables=bt.to(torch.int32).to(device), slot_mapping=slots.to(device),
        max_query_len=int(q_lens.max()), max_seq_len=max_seq_len or int(seq_lens.max()),
        query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens.tolist())
    q = torch.randn(T, H, D, device=device, dtype=dtype)
    k = torch.randn(T, KVH, D, device=device, dtype=dtype)
    v = torch.randn(T, KVH, D, device=device, dtype=dtype)
    return q, k, v, cache, meta


def rel_error(q, k, v, cache, meta, scale, out) -> float:
    """max |out - ref| / max |ref| with ref = the torch reference on fp32 copies of every input."""
    ref = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), cache.float(), meta, scale)
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def kv_bytes(meta: AttentionMetadata, m: dict, itemsize: int) -> int:
    return sum(meta.seq_lens_cpu) * m["num_kv_heads"] * m["head_dim"] * 2 * itemsize


def run_decode(device: str, budget: Budget, roof: float, log: Callable) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    backend = TritonAttentionBackend()
    log(f"\n== decode (bf16, block {BLOCK_SIZE}); copy roof {roof:.0f} GB/s ==")
    log(f"{'model':12s} {'bs':>4s} {'ctx':>6s} {'splits':>6s} {'rel_err':>9s} {'attn_us':>9s} {'GB/s':>7s} "
        f"{'%roof':>6s} {'write_us':>9s} {'fwd_us':>8s} {'graph_plan_us':>13s}")
    for name, m in MODELS.items():
        for bs, ctx in DECODE_CASES:
            if not budget.left():
                rows.append(dict(model=name, bs=bs, ctx=ctx, skipped="time budget"))
                continue
            q, k, v, cache, meta = build_batch([(ctx - 1, 1)] * bs, m, dtype, device)
            scale = 1 / math.sqrt(m["head_dim"])
            out = backend.forward(q, k, v, cache, meta, scale)
            err = rel_error(q, k, v, cache, meta, scale, out)
            splits = backend.decode_splits(bs, m["num_kv_heads"], meta.max_seq_len, q.device)
            args = (q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, bs, scale, None)
            t_attn = bench(lambda: K.paged_attention_decode(*args, num_splits=splits, mixed=True), graph=True)
            t_write = bench(lambda: K.reshape_and_cache(k, v, cache, meta.slot_mapping), graph=True)
            t_fwd = bench(lambda: backend.forward(q, k, v, cache, meta, scale), graph=True)
            # The plan a CUDA graph captured for max_model_len = 32K uses, at this real length:
            g_splits = backend.decode_splits(bs, m["num_kv_heads"], 32768, q.device)
            t_graph = bench(lambda: K.paged_attention_decode(*args, num_splits=g_splits, mixed=True), graph=True)
            gbs = kv_bytes(meta, m, 2) / t_attn / 1e3
            row = dict(model=name, bs=bs, ctx=ctx, splits=splits, rel_err=err, attn_us=t_attn, attn_gbs=gbs,
                       pct_roof=100 * gbs / roof, write_us=t_write, forward_us=t_fwd,
                       graph_plan_splits=g_splits, graph_plan_us=t_graph)
            rows.append(row)
            log(f"{name:12s} {bs:4d} {ctx:6d} {splits:6d} {err:9.2e} {t_attn:9.1f} {gbs:7.0f} {row['pct_roof']:6.1f} "
                f"{t_write:9.1f} {t_fwd:8.1f} {t_graph:9.1f}({g_splits})")
            del q, k, v, cache, meta, out
    return rows


def run_decode_ragged(device: str, budget: Budget, roof: float, log: Callable) -> list[dict]:
    """Ragged contexts (uniform in [100, 2048], as mid-way through the nano workload): programs in
    index order vs. longest first (``seq_order``), at the split plan of a graph for max_model_len 4096."""
    rows = []
    log("\n== decode, ragged contexts: index order vs longest first ==")
    backend = TritonAttentionBackend()
    gen = torch.Generator().manual_seed(0)
    cases = [("tiny", 8)] if SMOKE else [("qwen3-0.6b", 256), ("qwen3-0.6b", 128), ("qwen3-0.6b", 48), ("llama-8b", 256)]
    for name, bs in cases:
        if not budget.left():
            continue
        m = MODELS[name]
        ctx = torch.randint(100, 200 if SMOKE else 2049, (bs,), generator=gen).tolist()
        q, k, v, cache, meta = build_batch([(c - 1, 1) for c in ctx], m, torch.bfloat16, device)
        K.reshape_and_cache(k, v, cache, meta.slot_mapping)
        scale = 1 / math.sqrt(m["head_dim"])
        splits = backend.decode_splits(bs, m["num_kv_heads"], 4096, q.device)
        order = torch.argsort(meta.seq_lens, descending=True, stable=True).to(torch.int32)
        outs, times = [], []
        for seq_order in (None, order):
            out = torch.empty_like(q)
            args = (q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, bs, scale, None)
            times.append(bench(lambda: K.paged_attention_decode(*args, num_splits=splits, mixed=True,
                                                                seq_order=seq_order), graph=True))
            outs.append(out)
        same = torch.equal(outs[0], outs[1])
        gbs = [kv_bytes(meta, m, 2) / t / 1e3 for t in times]
        rows.append(dict(model=name, bs=bs, splits=splits, index_order_us=times[0], longest_first_us=times[1],
                         index_order_pct_roof=100 * gbs[0] / roof, longest_first_pct_roof=100 * gbs[1] / roof,
                         speedup=times[0] / times[1], identical=same))
        log(f"{name:12s} bs {bs:4d} splits {splits:3d}: index order {times[0]:8.1f} us ({100 * gbs[0] / roof:.0f}% roof), "
            f"longest first {times[1]:8.1f} us ({100 * gbs[1] / roof:.0f}% roof), identical={same}")
        del q, k, v, cache, meta, outs
    return rows


def run_decode_sweep(device: str, budget: Budget, roof: float, log: Callable) -> list[dict]:
    rows = []
    log("\n== decode sweep (tile_n, num_warps, splits) ==")
    targets = [("llama-8b", 1, 32768), ("llama-8b", 1, 4096), ("qwen3-0.6b", 256, 1024), ("qwen3-0.6b", 64, 2048)]
    if SMOKE:
        targets = [("tiny", 1, 600)]
    backend = TritonAttentionBackend()
    for name, bs, ctx in targets:
        m = MODELS[name]
        q, k, v, cache, meta = build_batch([(ctx - 1, 1)] * bs, m, torch.bfloat16, device)
        K.reshape_and_cache(k, v, cache, meta.slot_mapping)
        out = torch.empty_like(q)
        scale = 1 / math.sqrt(m["head_dim"])
        plan = backend.decode_splits(bs, m["num_kv_heads"], ctx, q.device)
        args = (q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, bs, scale, None)
        # tile x warps at the default split count, then halving / doubling the splits at the default tile.
        configs = [(plan, tile_n, warps) for tile_n in (32, 64, 128) for warps in (4, 8)]
        configs += [(s, 64, 4) for s in sorted({max(plan // 2, 1), plan * 2} - {plan})]
        for splits, tile_n, warps in configs:
            if not budget.left():
                continue
            t = bench(lambda: K.paged_attention_decode(*args, num_splits=splits, mixed=True, tile_n=tile_n,
                                                       num_warps=warps), graph=True)
            gbs = kv_bytes(meta, m, 2) / t / 1e3
            rows.append(dict(model=name, bs=bs, ctx=ctx, splits=splits, tile_n=tile_n, num_warps=warps,
                             attn_us=t, attn_gbs=gbs, pct_roof=100 * gbs / roof, default=splits == plan))
        best = min((r for r in rows if r["model"] == name and r["bs"] == bs and r["ctx"] == ctx),
                   key=lambda r: r["attn_us"], default=None)
        if best:
            log(f"{name:12s} bs {bs:3d} ctx {ctx:6d}: best splits {best['splits']} tile {best['tile_n']} "
                f"warps {best['num_warps']}: {best['attn_us']:.1f} us, {best['attn_gbs']:.0f} GB/s "
                f"({best['pct_roof']:.0f}% roof); default plan splits {plan}")
        del q, k, v, cache, meta, out
    return rows


def causal_flops(specs: list[tuple[int, int]], m: dict) -> float:
    visible = sum(q * c + q * (q + 1) / 2 for c, q in specs)
    return 4 * visible * m["head_dim"] * m["num_heads"]


def run_prefill(device: str, budget: Budget, log: Callable) -> list[dict]:
    rows = []
    backend = TritonAttentionBackend()
    log("\n== prefill / mixed (bf16, eager backend.forward incl. cache write) ==")
    log(f"{'model':12s} {'case':22s} {'tokens':>7s} {'rel_err':>9s} {'us':>9s} {'TFLOP/s':>8s} {'sdpa_us':>8s}")
    for name, m in MODELS.items():
        for case, specs in PREFILL_CASES.items():
            if not budget.left():
                rows.append(dict(model=name, case=case, skipped="time budget"))
                continue
            q, k, v, cache, meta = build_batch(specs, m, torch.bfloat16, device)
            scale = 1 / math.sqrt(m["head_dim"])
            ref_cache = cache.clone()
            out = backend.forward(q, k, v, cache, meta, scale)
            err = rel_error(q, k, v, ref_cache, meta, scale, out)
            t = bench(lambda: backend.forward(q, k, v, cache, meta, scale), graph=False)
            tflops = causal_flops(specs, m) / t / 1e6
            t_sdpa = float("nan")
            if not SMOKE and case == "prompt_2048":  # torch's flash attention on contiguous K/V, same work
                qq, kk, vv = (x.transpose(0, 1)[None] for x in (q, k, v))
                sdpa = torch.nn.functional.scaled_dot_product_attention
                try:
                    t_sdpa = bench(lambda: sdpa(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True), graph=False)
                except Exception as e:  # an older torch without enable_gqa: no comparison
                    log(f"sdpa failed: {e!r}"[:200])
            rows.append(dict(model=name, case=case, tokens=meta.num_actual_tokens, rel_err=err, us=t, tflops=tflops,
                             sdpa_us=t_sdpa))
            log(f"{name:12s} {case:22s} {meta.num_actual_tokens:7d} {err:9.2e} {t:9.1f} {tflops:8.1f} {t_sdpa:8.1f}")
            del q, k, v, cache, ref_cache, meta, out
    return rows


def run_fused(device: str, budget: Budget, roof: float, log: Callable) -> list[dict]:
    from vllm_engine.layers import fused_ops as F
    from vllm_engine.layers.activation import silu_and_mul as t_silu
    from vllm_engine.layers.layernorm import rms_norm as t_rms

    torch_ops = {"rms_norm": lambda x, w: t_rms(x, w, 1e-6), "fused_add_rms_norm": lambda x, r, w: t_rms(x, w, 1e-6, r),
                 "silu_and_mul": t_silu}
    triton_ops = {"rms_norm": lambda x, w: F.triton_rms_norm(x, w, 1e-6),
                  "fused_add_rms_norm": lambda x, r, w: F.triton_fused_add_rms_norm(x, r, w, 1e-6),
                  "silu_and_mul": F.triton_silu_and_mul}
    compiled = {}
    rows = []
    log("\n== fused ops (bf16): triton vs torch eager vs torch.compile(dynamic=True) ==")
    log(f"{'model':12s} {'op':20s} {'T':>5s} {'max_diff':>9s} {'triton_us':>9s} {'GB/s':>6s} {'eager_us':>9s} "
        f"{'compile_us':>10s}")
    dt = torch.bfloat16
    for name, m in MODELS.items():
        hid, inter = m["hidden"], m["inter"]
        for T in ((8,) if SMOKE else (256, 4096)):
            x, r = torch.randn(T, hid, device=device, dtype=dt), torch.randn(T, hid, device=device, dtype=dt)
            w = torch.randn(hid, device=device, dtype=dt)
            gu = torch.randn(T, 2 * inter, device=device, dtype=dt)
            cases = {"rms_norm": ((x, w), 2 * T * hid * 2), "fused_add_rms_norm": ((x, r, w), 4 * T * hid * 2),
                     "silu_and_mul": ((gu,), 3 * T * inter * 2)}
            for op, (args, nbytes) in cases.items():
                if not budget.left():
                    rows.append(dict(model=name, op=op, T=T, skipped="time budget"))
                    continue
                got, want = triton_ops[op](*args), torch_ops[op](*args)
                got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
                diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
                t_tr = bench(lambda: triton_ops[op](*args), graph=False)
                t_eager = bench(lambda: torch_ops[op](*args), graph=False)
                t_comp = float("nan")
                if not SMOKE:
                    try:
                        fn = compiled.setdefault(op, torch.compile(torch_ops[op], dynamic=True))
                        t_comp = bench(lambda: fn(*args), graph=False)
                    except Exception as e:  # report, keep going
                        log(f"torch.compile failed for {op}: {e!r}"[:200])
                gbs = nbytes / t_tr / 1e3
                rows.append(dict(model=name, op=op, T=T, max_abs_diff=diff, triton_us=t_tr, triton_gbs=gbs,
                                 pct_roof=100 * gbs / roof, eager_us=t_eager, compile_us=t_comp))
                log(f"{name:12s} {op:20s} {T:5d} {diff:9.2e} {t_tr:9.1f} {gbs:6.0f} {t_eager:9.1f} {t_comp:10.1f}")
    return rows


def compile_sm90() -> list[dict]:
    """Compiles every kernel for sm_90 without a GPU (triton's bundled ptxas), with the 16-divisible
    specializations the runtime JIT applies: catches typing errors the interpreter lets through, and
    reports whether K/V loads are software-pipelined (cp.async) and 16-byte vectorized."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_engine.layers import fused_ops as F
    from vllm_engine.layers import triton_linear as L

    not_div = {"stride_bt", "num_seqs", "sliding_window", "eps", "scale_log2", "M"}

    def build(fn, types: dict, consts: dict, num_warps: int = 4, num_stages: int = 3) -> dict:
        if "PDL" in fn.arg_names:  # the variant an H100 runs: launched with programmatic dependent launch
            consts = dict(consts, PDL=True)
        sig, attrs = {}, {}
        for i, n in enumerate(fn.arg_names):
            sig[n] = "constexpr" if n in consts else types[n]
            if n not in consts and (types[n].startswith("*") or (n not in not_div and types[n] in ("i32", "i64"))):
                attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        ptx = k.asm["ptx"]
        return dict(kernel=fn.__name__, consts={c: v for c, v in consts.items() if c.isupper()},
                    cp_async=k.asm["ttgir"].count("async_copy_global_to_local"), wgmma="wgmma" in ptx,
                    vec16=bool(re.search(r"ld\.global[.\w]*\.v4\.b32", ptx)), shared=k.metadata.shared,
                    pdl="griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx,
                    **ptxas_usage(ptx))

    def ptxas_usage(ptx: str) -> dict:
        """Registers per thread and spilled bytes, from triton's ptxas in verbose mode."""
        import subprocess
        import tempfile

        from triton.backends.nvidia import compiler as nv

        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            r = subprocess.run([nv.get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                               capture_output=True, text=True)
        regs = re.search(r"Used (\d+) registers", r.stderr)
        spills = re.search(r"(\d+) bytes spill stores", r.stderr)
        return dict(registers=int(regs.group(1)) if regs else None, spill_bytes=int(spills.group(1)) if spills else None)

    bf, i32, i64, f32 = "*bf16", "i32", "i64", "fp32"
    attn = dict(Q=bf, KCache=bf, VCache=bf, BlockTables="*i32", SeqLens="*i32", QueryStartLoc="*i32", Out=bf,
                scale_log2=f32, v_scale=f32, stride_qt=i32, stride_qh=i32, stride_bt=i32, stride_cb=i64, stride_ct=i32, stride_ch=i32,
                stride_ot=i32, stride_oh=i32, sliding_window=i32, cap_log2=f32, scale_over_cap=f32, num_seqs=i32,
                MidO="*fp32", MidLse="*fp32",
                stride_mo_s=i32, stride_mo_h=i32, stride_mo_p=i32, stride_ml_s=i32, stride_ml_h=i32, SeqOrder="*i32")
    dot = dict(DOT_PREC="tf32", DOT_F32=False, KV_FP8=False)
    cache_write = dict(K=bf, V=bf, KCache=bf, VCache=bf, Slots="*i64", stride_kt=i32, stride_kh=i32, stride_vt=i32,
                       stride_vh=i32, stride_cb=i64, stride_ct=i32, stride_ch=i32, inv_k_scale=f32, inv_v_scale=f32)
    write_consts = dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_H=8, BLOCK_D=128)
    out = [build(K._reshape_and_cache_kernel, cache_write, dict(write_consts, KV_FP8=False))]
    # kv_cache_dtype="fp8": the cache write, a decode and a prefill over an e4m3 cache
    fp8 = "*fp8e4nv"
    out.append(build(K._reshape_and_cache_kernel, dict(cache_write, KCache=fp8, VCache=fp8),
                     dict(write_consts, KV_FP8=True)))
    attn_fp8 = dict(attn, KCache=fp8, VCache=fp8)
    out.append(build(K._decode_kernel, attn_fp8, dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16,
                                                      TILE_N=64, NUM_SPLITS=1, MIXED=True, HAS_ORDER=True,
                                                      EARLY_V=False, **dict(dot, KV_FP8=True))))
    out.append(build(K._prefill_kernel, attn_fp8, dict(GROUP=4, BLOCK_M=64, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16,
                                                       TILE_N=64, SKIP_DECODES=True, **dict(dot, KV_FP8=True)),
                     num_warps=4, num_stages=2))
    for splits, group, head_dim in ((1, 2, 128), (16, 4, 128), (4, 3, 96)):
        out.append(build(K._decode_kernel, attn, dict(GROUP=group, BLOCK_G=16, HEAD_DIM=head_dim, BLOCK_D=128,
                                                      BLOCK_SIZE=16, TILE_N=64, NUM_SPLITS=splits, MIXED=True, HAS_ORDER=True,
                                                      EARLY_V=False,
                                                      **dot)))
    out.append(build(K._decode_reduce_kernel, attn, dict(NUM_SPLITS=16, HEAD_DIM=128, BLOCK_D=128, MIXED=True,
                                                         BY_ROW=False)))
    # A verifying step (k = 4) of Llama-8B's heads: 5 rows x GQA 4 per program, and its per-row reduce.
    multi = dict(attn, stride_mo_t=i32, stride_ml_t=i32)
    out.append(build(K._multi_query_decode_kernel, multi, dict(GROUP=4, BLOCK_G=4, QUERIES=5, BLOCK_M=32, HEAD_DIM=128,
                                                                BLOCK_D=128, BLOCK_SIZE=16, TILE_N=64, NUM_SPLITS=16,
                                                                **dot)))
    out.append(build(K._decode_reduce_kernel, attn, dict(NUM_SPLITS=16, HEAD_DIM=128, BLOCK_D=128, MIXED=False,
                                                         BY_ROW=True)))
    out.append(build(K._prefill_kernel, attn, dict(GROUP=4, BLOCK_M=64, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16,
                                                   TILE_N=64, SKIP_DECODES=True, **dot), num_warps=4, num_stages=2))
    out.append(build(F._rms_norm_kernel, dict(X=bf, R=bf, W=bf, Y=bf, ResOut=bf, stride_x=i32, stride_r=i32, stride_y=i32,
                     stride_ro=i32, eps=f32), dict(N=4096, HAS_RES=True, BLOCK=4096), num_warps=8))
    out.append(build(F._silu_and_mul_kernel, dict(X=bf, Y=bf, stride_x=i32, stride_y=i32), dict(D=3072, BLOCK=2048)))
    # The fused q/k-norm + rotary + cache write: Qwen3 (norm, GQA 16/8) and Llama-8B (no norm, 32/8).
    qkv = dict(QKV=bf, Pos="*i64", CosSin="*fp32", QNormW=bf, KNormW=bf, QOut=bf, KCache=bf, VCache=bf, Slots="*i64",
               stride_t=i32, stride_cs=i32, stride_qo=i32, stride_cb=i64, stride_ct=i32, stride_ch=i32, eps=f32,
               inv_k_scale=f32, inv_v_scale=f32)
    for hq, norm in ((16, True), (32, False)):
        out.append(build(F._qkv_rope_cache_kernel, qkv, dict(NUM_Q_HEADS=hq, NUM_KV_HEADS=8, HEAD_DIM=128, HALF=64,
                                                             BLOCK_HQ=hq, BLOCK_HK=8, BLOCK_HALF=64, BLOCK_D=128,
                                                             HAS_PASS=False, HAS_NORM=norm, BLOCK_SIZE=16,
                                                             KV_FP8=False)))
    gemv = dict(X=bf, W=bf, Bias=bf, Y=bf, R=bf, G=bf, ResOut=bf, N=i32, K=i32, stride_xm=i32, stride_wn=i32,
                stride_ym=i32, stride_rm=i32, stride_om=i32, eps=f32)
    for m in (1, 4):
        for bn, bk, warps, stages in L.GEMV_CONFIGS:
            out.append(build(L._gemv_kernel_impl, gemv, dict(M=m, BLOCK_M=m, HAS_BIAS=False, BLOCK_N=bn, BLOCK_K=bk,
                                                             PREFETCH=True, ADD_NORM=False, SILU_MUL=False),
                             num_warps=warps, num_stages=stages))
    # the norm folded in (add_norm_linear), twice; SiLU-and-mul folded in (silu_mul_linear)
    for (bn, bk, warps, stages), norm in (((4, 1024, 4, 2), True), ((16, 512, 8, 3), True), ((4, 512, 4, 3), False)):
        out.append(build(L._gemv_kernel_impl, gemv, dict(M=1, BLOCK_M=1, HAS_BIAS=False, BLOCK_N=bn, BLOCK_K=bk,
                                                         PREFETCH=True, ADD_NORM=norm, SILU_MUL=not norm),
                         num_warps=warps, num_stages=stages))
    mm = dict(X=bf, W=bf, Bias=bf, Y=bf, N=i32, K=i32, stride_xm=i32, stride_wn=i32, stride_ym=i32, M=i32)
    for bm, bn, bk, warps, stages in L.GEMM_CONFIGS:
        out.append(build(L._matmul_kernel_impl, mm, dict(HAS_BIAS=False, DOT_F32=False, DOT_PREC="tf32", BLOCK_M=bm,
                                                         BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages))
    from vllm_engine.layers import triton_sampler as S

    out.append(build(S._gumbel_argmax_kernel, dict(logits_ptr=bf, stride_row=i32, temp_ptr="*fp32", best_val_ptr="*fp32",
                                                   best_idx_ptr="*i32", vocab_size=i32, chunk=i32, seed=i32,
                                                   num_chunks=i32, tiles_per_row=i32), dict(BLOCK=2048),
                     num_warps=S.gumbel_num_warps(2048)))
    out.append(build(S._chunk_argmax_kernel, dict(best_val_ptr="*fp32", best_idx_ptr="*i32", out_ptr="*i64",
                                                  num_chunks=i32), dict(BLOCK_C=16)))
    for row in out:
        print(row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--budget-s", type=float, default=210.0, help="skip remaining cases after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    ap.add_argument("--compile-sm90", action="store_true", help="only compile every kernel for sm_90 (no GPU needed)")
    args = ap.parse_args()
    if args.compile_sm90:
        compile_sm90()
        return
    device = "cpu" if SMOKE else "cuda"
    t0 = time.time()
    budget = Budget(args.budget_s)

    def log(s: str) -> None:
        print(s, flush=True)

    roof = copy_bandwidth(device)
    result: dict[str, Any] = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
                                  torch=torch.__version__, copy_roof_gbs=roof)
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    with torch.inference_mode():
        for section, fn in (("decode", lambda: run_decode(device, budget, roof, log)),
                            ("decode_ragged", lambda: run_decode_ragged(device, budget, roof, log)),
                            ("prefill", lambda: run_prefill(device, budget, log)),
                            ("fused", lambda: run_fused(device, budget, roof, log)),
                            ("decode_sweep", lambda: run_decode_sweep(device, budget, roof, log))):
            try:
                result[section] = fn()
            except Exception as e:  # keep the other sections' results
                import traceback

                traceback.print_exc()
                result[section + "_error"] = repr(e)
            if device == "cuda":
                torch.cuda.empty_cache()
    result["elapsed_s"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"\nwrote {args.out} in {result['elapsed_s']:.0f}s")


if __name__ == "__main__":
    main()
