"""Compiles every Triton kernel of the GPU path for an H100 (sm_90) at real model shapes, on any
machine: Triton's own ptxas turns the generated PTX into a cubin without a GPU. This catches what the
CPU interpreter cannot: code the compiler rejects (types, layouts, shared memory). Run it in a process
without TRITON_INTERPRET (tests/kernels/test_sm90_compile.py does):

    python -m tests.kernels.sm90_compile
"""

from __future__ import annotations

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm_engine.attention import triton_kernels as K  # noqa: E402
from vllm_engine.layers import fused_ops as F  # noqa: E402
from vllm_engine.layers import triton_sampler as S  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"eps", "scale_log2"}

# (head_dim, q heads, kv heads, hidden, intermediate, vocab) of the bundled configs we benchmark
MODELS = {"qwen3-0.6b": (128, 16, 8, 1024, 3072, 151936), "llama-3.1-8b": (128, 32, 8, 4096, 14336, 128256)}


def compile_kernel(fn, ptrs: dict, consts: dict, num_warps: int = 4, num_stages: int = 3):
    """fn: a @triton.jit function; ptrs: pointer args -> Triton type ("*bf16"); consts: constexpr values.
    Other args are int32 scalars (float32 when named in FLOATS)."""
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = ptrs[n]
        else:
            sig[n] = "fp32" if n in FLOATS else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_usage(ptx: str) -> str:
    """Registers and spills of the kernel, from Triton's ptxas in verbose mode ('' when unavailable)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia import compiler as nv

    try:
        ptxas = nv.get_ptxas(TARGET.arch).path
    except Exception:
        return ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.search(r"(\d+) bytes spill stores", r.stderr)
    return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} B spilled"


def cases():
    bf, i64, i32, f32 = "*bf16", "*i64", "*i32", "*fp32"
    for model, (hd, hq, hkv, hidden, inter, vocab) in MODELS.items():
        p2 = triton.next_power_of_2
        yield f"{model} rms_norm+residual", F._rms_norm_kernel, dict(X=bf, R=bf, W=bf, Y=bf, ResOut=bf), \
            dict(N=hidden, HAS_RES=True, BLOCK=p2(hidden)), F._warps(p2(hidden))
        yield f"{model} silu_and_mul", F._silu_and_mul_kernel, dict(X=bf, Y=bf), \
            dict(D=inter, BLOCK=min(p2(inter), 2048)), F._warps(min(p2(inter), 2048))
        yield f"{model} reshape_and_cache", K._reshape_and_cache_kernel, \
            dict(K=bf, V=bf, KCache=bf, VCache=bf, Slots=i64), \
            dict(NUM_KV_HEADS=hkv, HEAD_DIM=hd, BLOCK_SIZE=16, BLOCK_H=p2(hkv), BLOCK_D=p2(hd)), 4
        yield f"{model} rotary", F._rotary_kernel, dict(Pos=i64, Q=bf, K=bf, CosSin=f32, QO=bf, KO=bf), \
            dict(NUM_Q_HEADS=hq, NUM_KV_HEADS=hkv, HEAD_DIM=hd, HALF=hd // 2, BLOCK_HQ=p2(hq), BLOCK_HK=p2(hkv),
                 BLOCK_HALF=p2(hd // 2), BLOCK_D=p2(hd), HAS_PASS=False), 4
        yield f"{model} qkv_rope_cache", F._qkv_rope_cache_kernel, \
            dict(QKV=bf, Pos=i64, CosSin=f32, QNormW=bf, KNormW=bf, QOut=bf, KCache=bf, VCache=bf, Slots=i64), \
            dict(NUM_Q_HEADS=hq, NUM_KV_HEADS=hkv, HEAD_DIM=hd, HALF=hd // 2, BLOCK_HQ=p2(hq), BLOCK_HK=p2(hkv),
                 BLOCK_HALF=p2(hd // 2), BLOCK_D=p2(hd), HAS_PASS=False, HAS_NORM=model.startswith("qwen3"),
                 BLOCK_SIZE=16), 4
        for m in (1, 4) if model == "llama-3.1-8b" else ():  # N and K are runtime values: one model is enough
            for cfg in F._gemv_configs():
                yield f"gemv M={m} {cfg.kwargs}", F._gemv_kernel_impl, dict(X=bf, W=bf, Bias=bf, Y=bf), \
                    dict(M=m, BLOCK_M=p2(m), HAS_BIAS=False, **cfg.kwargs), cfg.num_warps
        yield f"{model} gumbel (bf16 logits)", S._gumbel_argmax_kernel, \
            dict(logits_ptr=bf, temp_ptr=f32, best_val_ptr=f32, best_idx_ptr=i32), dict(BLOCK=2048), 8
        group = hq // hkv
        for splits in (1, 8):
            yield f"{model} decode splits={splits}", K._decode_kernel, \
                dict(Q=bf, KCache=bf, VCache=bf, BlockTables=i32, SeqLens=i32, QueryStartLoc=i32, Out=bf,
                     MidO=f32, MidLse=f32), \
                dict(GROUP=group, BLOCK_G=max(16, p2(group)), HEAD_DIM=hd, BLOCK_D=hd, BLOCK_SIZE=16, TILE_N=64,
                     NUM_SPLITS=splits, MIXED=True, DOT_PREC="tf32", DOT_F32=False), 4
        yield f"{model} prefill", K._prefill_kernel, \
            dict(Q=bf, KCache=bf, VCache=bf, BlockTables=i32, SeqLens=i32, QueryStartLoc=i32, Out=bf), \
            dict(GROUP=group, BLOCK_M=128, HEAD_DIM=hd, BLOCK_D=hd, BLOCK_SIZE=16, TILE_N=64, SKIP_DECODES=True,
                 DOT_PREC="tf32", DOT_F32=False), 8
    yield "decode reduce", K._decode_reduce_kernel, dict(MidO="*fp32", MidLse="*fp32", QueryStartLoc="*i32",
                                                          Out="*bf16"), \
        dict(NUM_SPLITS=8, HEAD_DIM=128, BLOCK_D=128, MIXED=True), 4
    yield "chunk argmax", S._chunk_argmax_kernel, dict(best_val_ptr="*fp32", best_idx_ptr="*i32", out_ptr="*i64"), \
        dict(BLOCK_C=16), 4


def main() -> int:
    failures = 0
    for name, fn, ptrs, consts, warps in cases():
        t0 = time.perf_counter()
        try:
            kernel = compile_kernel(fn, ptrs, consts, num_warps=warps)
            shared = kernel.metadata.shared
            print(f"ok    {name}: {time.perf_counter() - t0:.1f}s, shared memory {shared} B, "
                  f"{ptxas_usage(kernel.asm['ptx'])}")
            if shared > 227 * 1024:
                print(f"FAIL  {name}: needs {shared} B of shared memory, an H100 block has 227 KiB")
                failures += 1
        except Exception as e:  # report every kernel, then fail
            failures += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
