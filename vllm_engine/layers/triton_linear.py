"""The unquantized linear kernels on the GPU: cuBLAS, or a Triton kernel where that measures faster.

(The linear *layers* are in layers/linear.py; quantization/unquantized.py calls the picker below.)

A decode step multiplies a few hundred rows at most by each weight matrix. At 1-4 rows the work is a
GEMV that streams the weights once; at 8-256 rows a small GEMM whose tiles are too few to fill an
H100. cuBLAS is not always best at either, so for inputs of at most ``MAX_ROWS`` rows
``LinearPicker`` times cuBLAS against every tile config of our kernel (``triton_gemv`` for <= 4
rows, ``triton_matmul`` above) the first time it meets a shape, with the L2 cache flushed (by a
read) before each call as in a real step, and keeps the fastest (ours must beat cuBLAS by ``margin``). Shapes are keyed by the row count rounded
up to a power of 2, so a few dozen decisions cover every CUDA-graph bucket. Decisions are made in
the warm-up runs before graph capture, never inside a capture. Off CUDA it is ``F.linear``.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    from vllm_engine.layers.pdl import pdl_prologue
except ImportError:  # CPU-only installs: F.linear serves every call
    triton = None

from vllm_engine import envs
from vllm_engine.layers import pdl
from vllm_engine.layers.parallel_compile import compile_ahead, compiling_ahead, launch

logger = logging.getLogger(__name__)

MAX_ROWS = 256  # larger inputs (prefill) always take cuBLAS
GEMV_MAX_ROWS = 4  # up to here our candidates are the GEMV's configs, above the GEMM's

# The tile configs the picker tries: (BLOCK_N, BLOCK_K, num_warps, num_stages) for the GEMV,
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the GEMM.
GEMV_CONFIGS = [(4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (8, 512, 8, 3), (16, 256, 4, 3), (16, 512, 8, 3),
                (16, 256, 8, 4), (32, 256, 8, 3), (4, 1024, 4, 2), (8, 1024, 8, 2)]
GEMM_CONFIGS = [(16, 64, 128, 4, 5), (32, 64, 128, 4, 4), (64, 32, 128, 4, 4), (64, 64, 64, 4, 4), (64, 64, 128, 4, 3),
                (64, 128, 64, 4, 4), (128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3)]


if triton is not None:

    @triton.jit
    def _gemv_x_chunk(X, R, G, ResOut, k0, offs_m, offs_k, mmask, K, stride_xm, stride_rm, stride_om, ss,
                      write_res, ADD_NORM: tl.constexpr, SILU_MUL: tl.constexpr):
        """The [BLOCK_M, BLOCK_K] chunk of the GEMV's input at k0, in float32. With ADD_NORM it is
        (x + r) rounded to x's dtype (stored to ResOut by ``write_res``), times the norm weight g,
        and ``ss`` accumulates its sum of squares: the caller scales the result by the RMS. With
        SILU_MUL, x is [gate | up] (2K columns) and the chunk is silu(gate) * up, rounded as
        ``fused_ops.silu_and_mul`` rounds it."""
        kmask = (k0 + offs_k) < K
        m2 = mmask[:, None] & kmask[None, :]
        x = tl.load(X + offs_m[:, None] * stride_xm + k0 + offs_k[None, :], mask=m2, other=0.0)
        xf = x.to(tl.float32)
        if SILU_MUL:
            up = tl.load(X + offs_m[:, None] * stride_xm + K + k0 + offs_k[None, :], mask=m2, other=0.0)
            s = (xf / (1.0 + tl.exp(-xf))).to(X.dtype.element_ty).to(tl.float32)  # F.silu rounds here
            xf = (s * up.to(tl.float32)).to(X.dtype.element_ty).to(tl.float32)
        if ADD_NORM:
            r = tl.load(R + offs_m[:, None] * stride_rm + k0 + offs_k[None, :], mask=m2, other=0.0)
            h = (xf + r.to(tl.float32)).to(X.dtype.element_ty)
            if write_res:
                tl.store(ResOut + offs_m[:, None] * stride_om + k0 + offs_k[None, :], h, mask=m2)
            hf = h.to(tl.float32)
            ss += tl.sum(hf * hf, axis=1)
            g = tl.load(G + k0 + offs_k, mask=kmask, other=0.0).to(tl.float32)
            xf = hf * g[None, :]
        return xf, ss

    @triton.jit
    def _gemv_kernel_impl(X, W, Bias, Y, R, G, ResOut, N, K, stride_xm, stride_wn, stride_ym, stride_rm, stride_om,
                          eps, M: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                          ADD_NORM: tl.constexpr, SILU_MUL: tl.constexpr):
        """y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for a few rows m: each program streams BLOCK_N
        rows of W once, with float32 products accumulated elementwise and reduced at the end.

        ``PREFETCH`` (with PDL): the first W tile is loaded before waiting for the previous kernel
        (the weights do not depend on it), so that load overlaps the previous kernel's tail.

        ``ADD_NORM``: the input is RMSNorm(x + r) * g, the residual add and norm that would otherwise be
        their own kernel before this one (``fused_add_rms_norm``): every program streams all of K,
        so each accumulates the sum of squares itself and scales its outputs by 1/RMS at the end
        (the RMS is a per-row scalar); program 0 also stores x + r to ResOut. ``SILU_MUL``: the input is
        silu(x[:, :K]) * x[:, K:], the activation before a down projection."""
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mmask = offs_m < M
        nmask = offs_n < N
        write_res = pid == 0
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        w_ptr = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        k_first = 0
        if PREFETCH:
            w = tl.load(w_ptr, mask=nmask[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        pdl_prologue(PDL)
        if PREFETCH:
            x, ss = _gemv_x_chunk(X, R, G, ResOut, 0, offs_m, offs_k, mmask, K, stride_xm, stride_rm, stride_om,
                                  ss, write_res, ADD_NORM, SILU_MUL)
            acc += x[:, None, :] * w[None, :, :]
            k_first = BLOCK_K
        for k0 in range(k_first, K, BLOCK_K):
            kmask = (k0 + offs_k) < K
            w = tl.load(w_ptr + k0, mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            x, ss = _gemv_x_chunk(X, R, G, ResOut, k0, offs_m, offs_k, mmask, K, stride_xm, stride_rm, stride_om,
                                  ss, write_res, ADD_NORM, SILU_MUL)
            acc += x[:, None, :] * w[None, :, :]
        y = tl.sum(acc, axis=2)
        if ADD_NORM:
            y = y * tl.math.rsqrt(ss / K + eps)[:, None]
        if HAS_BIAS:
            y += tl.load(Bias + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


    @triton.jit
    def _matmul_kernel_impl(X, W, Bias, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                            HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PDL: tl.constexpr):
        """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)): y = x @ w.T (+ bias), fp32 accumulation on tensor
        cores. Column tiles vary fastest, so the programs running together share x tiles in L2."""
        pdl_prologue(PDL)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mmask = offs_m < M
        nmask = offs_n < N
        x_ptr = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptr = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # a [BLOCK_K, BLOCK_N] view of w.T
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + offs_k) < K
            a = tl.load(x_ptr + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_ptr + k0, mask=kmask[:, None] & nmask[None, :], other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])



def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


def _checked_out(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with a contiguous last dim, the empty [M, N] output) after checking weight [N, K] against x [M, K]."""
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(-1) != 1:
        raise ValueError(f"linear: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)


def _gemv_pdl_args(device: torch.device) -> dict:
    """PDL launch arguments; with PDL the first weight tile is prefetched before the wait."""
    args = pdl.launch_args(device)
    return dict(args, PREFETCH=args["PDL"])


def _launch_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor,
                 config: tuple, silu_mul: bool = False, norm: Optional[tuple] = None) -> None:
    """One ``_gemv_kernel_impl`` launch computing y [M, N] from x; ``norm``: (residual, norm weight,
    residual out, eps) for the folded add + RMSNorm."""
    m, (n, k) = x.shape[0], weight.shape
    if m == 0:
        return
    residual, norm_weight, res_out, eps = norm if norm is not None else (x, x, x, 0.0)
    block_n, block_k, warps, stages = config
    launch(
        _gemv_kernel_impl, (triton.cdiv(n, block_n),),
        x, weight, bias if bias is not None else weight, y, residual, norm_weight, res_out, n, k,
        x.stride(0), weight.stride(0), y.stride(0), residual.stride(0), res_out.stride(0), eps,
        M=m, BLOCK_M=triton.next_power_of_2(m), HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        ADD_NORM=norm is not None, SILU_MUL=silu_mul, num_warps=warps, num_stages=stages,
        **_gemv_pdl_args(x.device))


def triton_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                config: tuple = (8, 256, 4, 3)) -> torch.Tensor:
    """x [M, K] (M small), weight [N, K], bias [N] or None -> [M, N] in x.dtype.
    ``config``: (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    x, y = _checked_out(x, weight)
    _launch_gemv(x, weight, bias, y, config)
    return y


def triton_silu_mul_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         config: tuple = (4, 512, 4, 3)) -> torch.Tensor:
    """``linear(silu(x[:, :K]) * x[:, K:], weight, bias)`` in one GEMV kernel for x [M, 2K] (M small)
    and weight [N, K]: ``fused_ops.silu_and_mul`` folded into the GEMV, with its rounding."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != 2 * weight.shape[1] or weight.stride(-1) != 1:
        raise ValueError(f"silu_mul_gemv: weight {tuple(weight.shape)} does not match x {tuple(x.shape)} "
                         "(x must hold gate and up: twice the weight's columns)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch_gemv(x, weight, bias, y, config, silu_mul=True)
    return y


def triton_add_norm_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         config: tuple = (4, 1024, 4, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(rms_norm(x + residual) * norm_weight, weight, bias), x + residual)`` in one GEMV
    kernel, for x and residual [M, K] with M small: the residual add and RMSNorm of
    ``fused_ops.fused_add_rms_norm`` folded into the GEMV (see ``_gemv_kernel_impl``)."""
    x, y = _checked_out(x, weight)
    if residual.shape != x.shape or residual.stride(-1) != 1 or norm_weight.shape != (x.shape[1],):
        raise ValueError(f"add_norm_gemv: residual {tuple(residual.shape)} / norm weight "
                         f"{tuple(norm_weight.shape)} do not match x {tuple(x.shape)}")
    res_out = torch.empty_like(x)
    _launch_gemv(x, weight, bias, y, config, norm=(residual, norm_weight, res_out, eps))
    return y, res_out


def triton_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  config: tuple = (64, 64, 64, 4, 4)) -> torch.Tensor:
    """x [M, K], weight [N, K], bias [N] or None -> [M, N] in x.dtype, for M up to a few hundred.
    ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    x, y = _checked_out(x, weight)
    (m, k), n = x.shape, y.shape[1]
    if m == 0:
        return y
    dot_f32 = x.dtype == torch.bfloat16 and envs.triton_interpret()  # the interpreter's bf16 dot is wrong
    block_m, block_n, block_k, warps, stages = config
    launch(
        _matmul_kernel_impl, (triton.cdiv(n, block_n), triton.cdiv(m, block_m)),
        x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, DOT_F32=dot_f32, DOT_PREC="ieee" if x.dtype == torch.float32 or dot_f32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        **pdl.launch_args(x.device))
    return y


HOST_HEAD_START_CYCLES = 500_000  # ~0.3 ms of GPU spinning: longer than a Python launch of any candidate


def cuda_time_s(fn: Callable[[], object], reps: int = 15, flush_bytes: int = 64 << 20, warmup: int = 3,
                flush: str = "read") -> float:
    """Median seconds of ``fn()`` on the GPU, with the L2 cache flushed before every call (a decode
    step reads each weight from HBM, not from L2); ``flush_bytes=0``: no flush.

    ``flush="read"`` sums a buffer larger than L2, leaving it full of clean lines, as the previous
    layers' weight reads do in a real step. ``"write"`` zeroes it instead: the timed call's misses
    then also write the dirty lines back, which added 2-13 us to each Llama-8B GEMV and ranked the
    candidates differently from the same calls inside a CUDA graph (``gemv_stack.py``); the read
    flush ranks them as the graph does.

    The GPU spins (``torch.cuda._sleep``) before each rep so that the host has queued the flush, the
    events and ``fn``'s kernels before the GPU gets to them: the time is the kernels' alone, as in a
    replayed CUDA graph. Without it a microsecond-scale kernel would be timed together with its
    Python launch (tens of microseconds, more for a Triton launch than for cuBLAS)."""
    if flush not in ("read", "write"):
        raise ValueError(f"flush must be 'read' or 'write', got {flush!r}")
    buf = torch.zeros(flush_bytes // 4, dtype=torch.int32, device="cuda") if flush_bytes else None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda._sleep(HOST_HEAD_START_CYCLES)
        if buf is not None and flush == "read":
            buf.sum()
        elif buf is not None:
            buf.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


class LinearPicker:
    """``picker(x, weight, bias=None)`` is ``F.linear(x, weight, bias)``, computed by whichever of
    cuBLAS and our Triton kernel measured faster for the shape (see the module docstring).

    ``timer(fn) -> seconds`` is injectable (tests); ``decisions`` maps each key
    (rows rounded up to a power of 2, N, K, dtype, has bias) to (choice, {candidate: seconds})."""

    # (L2 flush, margin) per kind of candidate. The GEMV's were checked against the same calls inside
    # a CUDA graph (tests/benchmarks/gemv_stack.py, Llama-8B at 1 row): with a read flush the fastest
    # alone was the fastest in the graph for all four shapes, but by 2-3% where the graph showed
    # 4-12% (o and gate/up projections), so any margin leaves the choice to noise: none is used.
    # The GEMM's (8-256 rows) keep the settings the nano throughput was measured with: a read flush
    # moved 11 Qwen3 shapes to our GEMM, and the run that had them was slower; they go back to the
    # read flush once gemv_stack covers those rows.
    GEMV_TIMING = ("read", 0.0)
    GEMM_TIMING = ("write", 0.05)

    def __init__(self, margin: Optional[float] = None,
                 timer: Optional[Callable[..., float]] = None, max_rows: int = MAX_ROWS) -> None:
        self.margin = margin  # None: the kind's own (GEMV_TIMING / GEMM_TIMING)
        self.timer = timer or cuda_time_s
        self.timing_seconds = 0.0  # spent timing candidates (start-up reports it)
        self.max_rows = max_rows
        self.decisions: dict[tuple, tuple[str, dict[str, float]]] = {}
        self._fns: dict[tuple, Callable] = {}  # the chosen function per key
        self._preferred: dict[str, str] = {}  # str(key) -> a choice an earlier run measured (prefer())

    @classmethod
    def timing(cls, m: int) -> tuple[str, float]:
        """(L2 flush, margin) for inputs of ``m`` rows: the GEMV's or the GEMM's."""
        return cls.GEMV_TIMING if m <= GEMV_MAX_ROWS else cls.GEMM_TIMING

    @staticmethod
    def candidates(m: int) -> dict[str, Callable]:
        """cuBLAS, and each tile config of our kernel for ``m`` rows: "gemv 8x256 w4 s3", "gemm 64x64x64 w4 s4"..."""
        out: dict[str, Callable] = {"cublas": F.linear}
        if m <= GEMV_MAX_ROWS:
            for c in GEMV_CONFIGS:
                out["gemv %dx%d w%d s%d" % c] = functools.partial(triton_gemv, config=c)
        else:
            for c in GEMM_CONFIGS:
                if c[0] <= max(16, _bucket(m)):  # no row tile larger than the rows rounded up
                    out["gemm %dx%dx%d w%d s%d" % c] = functools.partial(triton_matmul, config=c)
        return out

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if triton is None or not x.is_cuda or x.dim() != 2 or not 0 < x.shape[0] <= self.max_rows:
            return F.linear(x, weight, bias)
        m = x.shape[0]
        key = (_bucket(m), weight.shape[0], weight.shape[1], x.dtype, bias is not None)
        if key not in self.decisions:
            if torch.cuda.is_current_stream_capturing():  # never time inside a graph capture
                return F.linear(x, weight, bias)
            flush, margin = self.timing(m)
            if self.decide(key, self.candidates(m), x, weight, bias, flush=flush, margin=margin) is None:
                return F.linear(x, weight, bias)  # inside compile_ahead: timed at the next call
        return self._fns[key](x, weight, bias)

    def add_norm_linear(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(linear(rms_norm(x + residual) * norm_weight), x + residual)``, the residual add and norm
        before a decoder layer's q/k/v or gate/up projection. At up to ``GEMV_MAX_ROWS`` rows on CUDA
        the norm can be folded into our GEMV (``triton_add_norm_gemv``: one kernel instead of two);
        that is timed, the first time a shape comes, against the norm kernel followed by the linear
        this picker chose for it ("unfused"), and the faster one kept."""
        from vllm_engine.layers import fused_ops

        def unfused(x, residual, norm_weight, eps, weight, bias):
            h, res = fused_ops.fused_add_rms_norm(x, residual, norm_weight, eps)
            return self(h, weight, bias), res

        return self._fused("add_norm", triton_add_norm_gemv, unfused, x, residual, norm_weight, eps, weight, bias)

    def silu_mul_linear(self, x: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``linear(silu(x[:, :K]) * x[:, K:])``, the activation and down projection of a gated MLP. At up
        to ``GEMV_MAX_ROWS`` rows on CUDA the activation can be folded into our GEMV
        (``triton_silu_mul_gemv``), timed like ``add_norm_linear``."""
        from vllm_engine.layers import fused_ops

        def unfused(x, weight, bias):
            return self(fused_ops.silu_and_mul(x), weight, bias)

        return self._fused("silu_mul", triton_silu_mul_gemv, unfused, x, weight, bias)

    def _fused(self, kind: str, kernel: Callable, unfused: Callable, x: torch.Tensor, *rest) -> object:
        """``unfused(x, *rest)`` (an elementwise kernel, then this picker's linear) or ``kernel``: the
        same folded into our GEMV, whichever measured faster for the key (kind, rows rounded up to a
        power of 2, N, K, dtype, bias); ``rest`` ends with (weight, bias)."""
        weight, bias = rest[-2], rest[-1]
        args = (x, *rest)
        if triton is None or not x.is_cuda or x.dim() != 2 or not 0 < x.shape[0] <= min(GEMV_MAX_ROWS, self.max_rows):
            return unfused(*args)
        key = (kind, _bucket(x.shape[0]), weight.shape[0], weight.shape[1], x.dtype, bias is not None)
        if key not in self.decisions:
            if torch.cuda.is_current_stream_capturing():
                return unfused(*args)
            out = unfused(*args)  # the linear's own decision first: "unfused" then times the picked kernel
            candidates = {"unfused": unfused}
            for c in GEMV_CONFIGS:
                candidates[f"{kind} gemv %dx%d w%d s%d" % c] = functools.partial(kernel, config=c)
            if self.decide(key, candidates, *args, flush="read", margin=0.0, baseline="unfused") is None:
                return out  # inside compile_ahead: timed at the next call
        return self._fns[key](*args)

    def decide(self, key: tuple, candidates: dict[str, Callable], *args, flush: str = "read",
               margin: float = 0.05, baseline: str = "cublas") -> Optional[tuple[str, dict[str, float]]]:
        """Times every candidate on ``args`` (``timer(fn, flush=...)``), after compiling our kernels'
        variants side by side (``compile_ahead``); the ``baseline`` candidate unless our fastest is
        faster by the margin (``self.margin`` when set, else ``margin``). A negative margin lets ours
        win while slower by up to that fraction (-1: always ours). Inside a caller's
        ``compile_ahead`` (where launches only compile) it queues our candidates' compiles, decides
        nothing and returns None."""
        known = self._preferred.get(str(key))
        if known in candidates:  # measured by an earlier run on this GPU and software (worker/startup_cache.py)
            self.decisions[key] = (known, {})
            self._fns[key] = candidates[known]
            return self.decisions[key]
        ours = [name for name in candidates if name != baseline]
        if compiling_ahead():
            for name in ours:
                candidates[name](*args)
            return None
        with compile_ahead() as ahead:  # our kernels' tile configs compile side by side, then are timed
            if ahead:
                for name in ours:
                    candidates[name](*args)
        t0 = time.perf_counter()
        times = {name: self.timer(lambda fn=fn: fn(*args), flush=flush) for name, fn in candidates.items()}
        self.timing_seconds += time.perf_counter() - t0
        best = min(ours, key=times.get) if ours else baseline
        margin = self.margin if self.margin is not None else margin
        choice = best if times[best] < (1 - margin) * times[baseline] else baseline
        self.decisions[key] = (choice, times)
        self._fns[key] = candidates[choice]
        logger.debug("linear %s: %s (%s)", key, choice, {k: f"{v * 1e6:.1f}us" for k, v in times.items()})
        return self.decisions[key]

    def choices(self) -> dict[str, str]:
        """str(key) -> choice of every decision, for ``prefer`` in a later run."""
        return {str(key): choice for key, (choice, _) in self.decisions.items()}

    def prefer(self, choices: dict[str, str]) -> None:
        """Choices an earlier run measured (``choices()``): ``decide`` takes them without timing,
        where the choice is still one of the shape's candidates."""
        self._preferred.update(choices)

    def summary(self) -> str:
        """One line for the startup log: which kernel each shape got, and the time it saved."""
        if not self.decisions:
            return "linear: no shapes timed"
        counts: dict[str, int] = {}
        saved, cached = 0.0, 0
        for choice, times in self.decisions.values():
            kind = choice.split()[0]
            counts[kind] = counts.get(kind, 0) + 1
            if not times:  # taken from the start-up cache
                cached += 1
                continue
            saved += times["cublas" if "cublas" in times else "unfused"] - times[choice]
        parts = ", ".join(f"{c} for {n}" for c, n in sorted(counts.items()))
        return (f"linear kernels over {len(self.decisions)} shapes ({cached} from the start-up cache): {parts}; "
                f"one call of each timed shape takes {saved * 1e6:.0f} us less in total than cuBLAS (and a "
                "separate norm kernel)")
