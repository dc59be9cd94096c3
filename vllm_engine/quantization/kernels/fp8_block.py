"""Block-scaled FP8 linear (DeepSeek / Qwen3 FP8 checkpoints, ``weight_block_size``): e4m3 weights with
one float32 scale per [block_n, block_k] block, activations quantized to e4m3 per token and per group
of ``block_k`` inputs.

``y[m, n] = sum_b (sum_{k in b} xq[m, k] * wq[n, k]) * x_scale[m, b] * w_scale[n, b] (+ bias[n])``

The weight scales are held per output row (``w_scale`` [N, K / block_k]: a block's scale repeated over
its rows at load), so fused layers whose parts are not whole blocks of rows index them directly.
``fp8_block_linear`` runs the Triton kernel on CUDA (``tl.dot`` on FP8 tensor cores, each K step of
``block_k`` scaled by its two scales), and the same arithmetic in float32 elsewhere.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    from vllm_engine.layers.pdl import pdl_prologue
except ImportError:  # CPU-only installs: the torch path
    triton = None

from vllm_engine import envs
from vllm_engine.layers import pdl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def quantize_per_token_group(x: torch.Tensor, group: int,
                             use_triton: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, K / group]): each row's groups of ``group`` inputs
    (``group`` = K: per token) scaled by their absolute maximum over 448. ``use_triton`` (default: CUDA
    with Triton): one kernel instead of five torch ops, a batch-1 step having one per FP8 linear."""
    m, k = x.shape
    if use_triton is None:
        use_triton = triton is not None and x.is_cuda
    if use_triton and m > 0:
        return _quantize_triton(x, group)
    xg = x.float().reshape(m, k // group, group)
    scale = (xg.abs().amax(-1) / FP8_MAX).clamp(min=MIN_SCALE)
    return (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(m, k), scale


def _quantize_triton(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    # Triton's interpreter rounds float32 -> e4m3 wrongly (1.95 * 2**6 becomes 2**6, the mantissa's carry
    # lost): under it the kernel writes the scaled float32 values and torch rounds them.
    interpret = envs.triton_interpret()
    x_q = torch.empty(m, k, dtype=torch.float32 if interpret else FP8_DTYPE, device=x.device)
    scale = torch.empty(m, k // group, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(group)
    _quantize_group_kernel[(m, k // group)](x, x_q, scale, x.stride(0), k, group, FP8_MAX, MIN_SCALE, BLOCK=block,
                                            num_warps=4 if block <= 1024 else 8)
    return (x_q.to(FP8_DTYPE) if interpret else x_q), scale


if triton is not None:

    @triton.jit
    def _quantize_group_kernel(X, XQ, S, stride_xm, K, group, fp8_max, min_scale, BLOCK: tl.constexpr):
        """Grid (M, K / group): one group of one row: its absolute maximum over 448 (at least
        min_scale) to S, the group divided by it, saturated, to XQ (e4m3; float32 in the interpreter)."""
        row, g = tl.program_id(0), tl.program_id(1)
        offs = g * group + tl.arange(0, BLOCK)
        mask = tl.arange(0, BLOCK) < group
        x = tl.load(X + row.to(tl.int64) * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / fp8_max, min_scale)
        q = tl.minimum(tl.maximum(x / scale, -fp8_max), fp8_max)
        tl.store(XQ + row.to(tl.int64) * K + offs, q.to(XQ.dtype.element_ty), mask=mask)
        tl.store(S + row * (K // group) + g, scale)

    @triton.jit
    def _fp8_block_gemm_kernel(XQ, XS, W, WS, Bias, Y, M, N, K, stride_xm, stride_xsm, stride_wn, stride_wsn,
                               stride_ym, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)); BLOCK_K is the scale group: each K step's partial
        product is scaled by its activation and weight scales before accumulating (float32)."""
        pdl_prologue(PDL)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mmask = offs_m < M
        nmask = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(XQ + offs_m[:, None].to(tl.int64) * stride_xm + k0 + offs_k[None, :], mask=mmask[:, None],
                        other=0.0)
            b = tl.load(W + offs_n[None, :].to(tl.int64) * stride_wn + k0 + offs_k[:, None], mask=nmask[None, :],
                        other=0.0)
            if DOT_F32:
                part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(a, b)
            a_s = tl.load(XS + offs_m * stride_xsm + k0 // BLOCK_K, mask=mmask, other=0.0)
            b_s = tl.load(WS + offs_n.to(tl.int64) * stride_wsn + k0 // BLOCK_K, mask=nmask, other=0.0)
            acc += part * a_s[:, None] * b_s[None, :]
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


def fp8_block_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                   block_k: int, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                   config: Optional[tuple] = None) -> torch.Tensor:
    """The Triton kernel: x_q [M, K] e4m3, x_scale [M, K / block_k], weight [N, K] e4m3, w_scale
    [N, K / block_k] -> [M, N] in ``out_dtype``. ``config``: (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    m, k = x_q.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0:
        return y
    block_m, block_n, warps, stages = config or ((16, 64, 4, 3) if m <= 16 else (64, 128, 8, 3))
    _fp8_block_gemm_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
        x_q, x_scale, weight, w_scale, bias if bias is not None else w_scale, y, m, n, k, x_q.stride(0),
        x_scale.stride(0), weight.stride(0), w_scale.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        DOT_F32=envs.triton_interpret(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages, **pdl.launch_args(x_q.device))
    return y


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, block_k: int,
                     bias: Optional[torch.Tensor] = None, use_triton: Optional[bool] = None) -> torch.Tensor:
    """x [M, K] (any float dtype) times the block-scaled e4m3 ``weight`` [N, K] (``w_scale`` [N, K / block_k]
    float32) -> [M, N] in x.dtype; x quantized per token and group of ``block_k``. ``use_triton``
    (default: CUDA with Triton): the kernel, else float32 arithmetic."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    x_q, x_scale = quantize_per_token_group(x, block_k)
    if use_triton is None:
        use_triton = triton is not None and x.is_cuda
    if use_triton:
        return fp8_block_gemm(x_q, x_scale, weight, w_scale, block_k, bias, x.dtype)
    xf = (x_q.float().reshape(x.shape[0], -1, block_k) * x_scale[..., None]).reshape(x.shape)
    wf = (weight.float().reshape(weight.shape[0], -1, block_k) * w_scale[..., None]).reshape(weight.shape)
    y = xf @ wf.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


__all__ = ["fp8_block_gemm", "fp8_block_linear", "quantize_per_token_group"]
