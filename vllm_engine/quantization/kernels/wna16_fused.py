"""The W4A16 / W8A16 GEMV with the elementwise op before it folded in (CUDA, a few rows), as the
unquantized GEMV folds them (layers/triton_linear.py): one kernel instead of two per projection.

* ``wna16_add_norm_gemv``: ``(linear(rms_norm(x + residual) * g), x + residual)``, the residual add and
  RMSNorm before q/k/v or gate/up. Every program streams all of K, so each accumulates the sum of
  squares itself and scales its outputs by 1 / RMS at the end; program 0 stores x + residual.
* ``wna16_silu_mul_gemv``: ``linear(silu(x[:, :K]) * x[:, K:])``, the activation before a down projection.

The input's chunks come from ``triton_linear._gemv_x_chunk`` (the unquantized GEMV's, with its
rounding), the weight's tiles from ``wna16._wna16_tile``. Weights whose input columns are permuted
(act order sorted into runs) are not folded: the op runs first, then the permuted product.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_engine.layers import pdl
from vllm_engine.quantization.kernels.wna16 import WNA16Weight, _block_k, triton

if triton is not None:
    import triton.language as tl

    from vllm_engine.layers.pdl import pdl_prologue
    from vllm_engine.layers.triton_linear import _gemv_x_chunk
    from vllm_engine.quantization.kernels.wna16 import _wna16_tile

    @triton.jit
    def _wna16_fused_gemv_kernel(X, R, G, ResOut, QW, S, Z, GI, Bias, Y, M, N, K, group_size, stride_xm, stride_rm,
                                 stride_om, stride_ym, eps, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                                 HAS_GIDX: tl.constexpr, HAS_MINS: tl.constexpr, HAS_LUT: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, ADD_NORM: tl.constexpr, SILU_MUL: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 PDL: tl.constexpr):
        """Grid (cdiv(N, BLOCK_N),): the GEMV of ``wna16._wna16_gemv_kernel`` (no split-K) over the input
        chunks of ``_gemv_x_chunk`` (ADD_NORM: x + r times g, its sum of squares accumulated;
        SILU_MUL: silu(gate) * up)."""
        pdl_prologue(PDL)
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mmask = offs_m < M
        nmask = offs_n < N
        write_res = pid == 0
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _wna16_tile(QW, S, Z, GI, k0, offs_n, nmask, N, K, group_size, BITS, HAS_ZEROS, HAS_GIDX,
                            BLOCK_K, BLOCK_N, HAS_MINS, HAS_LUT)
            x, ss = _gemv_x_chunk(X, R, G, ResOut, k0, offs_m, offs_k, mmask, K, stride_xm, stride_rm, stride_om,
                                  ss, write_res, ADD_NORM, SILU_MUL)
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        if ADD_NORM:
            acc = acc * tl.math.rsqrt(ss / K + eps)[:, None]
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


def _launch(x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor], config: tuple, silu_mul: bool,
            norm: Optional[tuple]) -> torch.Tensor:
    """One fused launch; ``norm``: (residual, norm weight, residual out, eps)."""
    if w.perm is not None:
        raise ValueError("wna16 fused GEMV: a weight with permuted input columns cannot fold the op before it")
    y = torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return y
    residual, norm_weight, res_out, eps = norm if norm is not None else (x, x, x, 0.0)
    s = w.lut if w.lut is not None else w.scales
    z = w.mins if w.mins is not None else w.zeros if w.zeros is not None else s
    block_n, block_k, warps, stages = config[:4]
    _wna16_fused_gemv_kernel[(triton.cdiv(w.out_features, block_n),)](
        x, residual, norm_weight, res_out, w.qweight, s, z, w.g_idx if w.g_idx is not None else w.qweight,
        bias if bias is not None else s, y, x.shape[0], w.out_features, w.in_features, w.group_size, x.stride(0),
        residual.stride(0), res_out.stride(0), y.stride(0), eps, BITS=w.bits, HAS_ZEROS=w.zeros is not None,
        HAS_GIDX=w.g_idx is not None, HAS_MINS=w.mins is not None, HAS_LUT=w.lut is not None,
        HAS_BIAS=bias is not None, ADD_NORM=norm is not None, SILU_MUL=silu_mul,
        BLOCK_M=max(triton.next_power_of_2(x.shape[0]), 1), BLOCK_N=block_n, BLOCK_K=_block_k(w, block_k),
        num_warps=warps, num_stages=stages, **pdl.launch_args(x.device))
    return y


def wna16_add_norm_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        w: WNA16Weight, bias: Optional[torch.Tensor] = None,
                        config: tuple = (64, 128, 4, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [M, K] (M small) -> (linear(rms_norm(x + residual) * norm_weight), x + residual)."""
    if (x.dim() != 2 or residual.shape != x.shape or x.shape[1] != w.in_features or x.stride(-1) != 1
            or residual.stride(-1) != 1 or norm_weight.shape != (x.shape[1],)):
        raise ValueError(f"wna16 add_norm GEMV: x {tuple(x.shape)}, residual {tuple(residual.shape)}, norm weight "
                         f"{tuple(norm_weight.shape)} do not match a weight of {w.in_features} inputs")
    res_out = torch.empty_like(x)
    return _launch(x, w, bias, config, False, (residual, norm_weight, res_out, eps)), res_out


def wna16_silu_mul_gemv(x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor] = None,
                        config: tuple = (64, 128, 4, 3)) -> torch.Tensor:
    """x [M, 2K] = [gate | up] (M small) -> linear(silu(gate) * up)."""
    if x.dim() != 2 or x.shape[1] != 2 * w.in_features or x.stride(-1) != 1:
        raise ValueError(f"wna16 silu_mul GEMV: x {tuple(x.shape)} must hold gate and up for a weight of "
                         f"{w.in_features} inputs")
    return _launch(x, w, bias, config, True, None)


__all__ = ["wna16_add_norm_gemv", "wna16_silu_mul_gemv"]
