"""Fused elementwise ops as Triton kernels: RMSNorm (+ residual add), SiLU-and-mul, neox rotary.

Each is one bandwidth-bound pass (one read and one write per element), with the same rounding
points as the torch versions in layernorm.py / activation.py / rotary.py so outputs match them
bit-for-bit up to the order of the fp32 reduction. ``rms_norm`` etc. dispatch: CUDA tensors to
the kernels, others to those torch versions. ``triton_rms_norm`` etc. always launch the kernels
(CPU tensors under ``TRITON_INTERPRET=1``: the tests). All ops take a last dim that is contiguous;
leading dims are flattened into rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_engine.layers import activation as _act
from vllm_engine.layers import layernorm as _ln
from vllm_engine.layers import rotary as _rot

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch versions serve every call
    triton = None


def _use_triton(x: torch.Tensor) -> bool:
    # CUDA only: the interpreter (tests) is reached through the triton_* functions, so a process
    # that set TRITON_INTERPRET=1 for kernel tests keeps running CPU models on the torch versions.
    return triton is not None and x.is_cuda


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as 2-D [rows, last] without copying when the layout allows."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _warps(block: int) -> int:
    # ~8-16 elements per thread: 16-byte vector accesses for 16-bit dtypes.
    return min(16, max(4, block // 512))


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, R, W, Y, ResOut, stride_x, stride_r, stride_y, stride_ro, eps,
                         N: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row of N: (optional x + r rounded to x's dtype -> ResOut), then RMS norm.
        N is a constexpr (a model constant) so masks fold away and accesses stay 16-byte vectors."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(ResOut + row * stride_ro + offs, x, mask=mask)
        h = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(h * h, 0) / N + eps)
        hn = (h * rstd).to(X.dtype.element_ty).to(tl.float32)  # rounded like h.to(orig_dtype)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + offs, (w * hn).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(X, Y, stride_x, stride_y, D: tl.constexpr, BLOCK: tl.constexpr):
        """Grid (rows, cdiv(D, BLOCK)): y = silu(gate) * up with gate = x[:D], up = x[D:]."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        g = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty).to(tl.float32)  # F.silu rounds here
        tl.store(Y + row * stride_y + offs, (s * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_heads(X, O, t, cos, sin, stride_xt, stride_xh, stride_ot, stride_oh, NUM_HEADS: tl.constexpr,
                      HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                      BLOCK_D: tl.constexpr, HAS_PASS: tl.constexpr):
        """Rotates all heads of token t: [BLOCK_H, half] halves; dims >= 2 * half are copied."""
        offs_h = tl.arange(0, BLOCK_H)[:, None]
        offs_r = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (offs_h < NUM_HEADS) & (offs_r < HALF)
        src = X + t * stride_xt + offs_h * stride_xh + offs_r
        dst = O + t * stride_ot + offs_h * stride_oh + offs_r
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, (x1 * cos - x2 * sin).to(O.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(O.dtype.element_ty), mask=mask)
        if HAS_PASS:
            offs_d = tl.arange(0, BLOCK_D)[None, :]
            pmask = (offs_h < NUM_HEADS) & (offs_d >= 2 * HALF) & (offs_d < HEAD_DIM)
            xp = tl.load(X + t * stride_xt + offs_h * stride_xh + offs_d, mask=pmask)
            tl.store(O + t * stride_ot + offs_h * stride_oh + offs_d, xp, mask=pmask)

    @triton.jit
    def _rotary_kernel(Pos, Q, K, CosSin, QO, KO, stride_cs,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                       NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                       BLOCK_D: tl.constexpr, HAS_PASS: tl.constexpr):
        """One program per token: cos/sin of its position are read once for all q and k heads."""
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(Pos + t).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_HALF)[None, :]
        cmask = offs_r < HALF
        cos = tl.load(CosSin + pos * stride_cs + offs_r, mask=cmask, other=0.0).to(tl.float32)
        sin = tl.load(CosSin + pos * stride_cs + HALF + offs_r, mask=cmask, other=0.0).to(tl.float32)
        _rotary_heads(Q, QO, t, cos, sin, stride_qt, stride_qh, stride_qot, stride_qoh, NUM_Q_HEADS, HEAD_DIM,
                      HALF, BLOCK_HQ, BLOCK_HALF, BLOCK_D, HAS_PASS)
        _rotary_heads(K, KO, t, cos, sin, stride_kt, stride_kh, stride_kot, stride_koh, NUM_KV_HEADS, HEAD_DIM,
                      HALF, BLOCK_HK, BLOCK_HALF, BLOCK_D, HAS_PASS)


def _rms_norm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    shape, n = x.shape, x.shape[-1]
    x2 = _rows(x)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)  # as `weight * h.to(x.dtype)` in torch
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if residual is not None:
        r2 = _rows(residual)
        res_out = torch.empty_like(x2)
    else:
        r2 = res_out = x2  # unused
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, y, res_out, x2.stride(0), r2.stride(0), y.stride(0), res_out.stride(0), eps,
            N=n, HAS_RES=residual is not None, BLOCK=block, num_warps=_warps(block))
    return y.view(shape), (res_out.view(shape) if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden] (fp16/bf16/fp32); weight: [hidden] -> y = x / rms(x) * weight, [..., hidden]."""
    return triton_rms_norm(x, weight, eps) if _use_triton(x) else _ln.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (rounded to x.dtype); returns (rms_norm(s) * weight, s) as new tensors."""
    if _use_triton(x):
        return triton_fused_add_rms_norm(x, residual, weight, eps)
    return _ln.rms_norm(x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] holding [gate, up] -> silu(gate) * up: [..., d] in x.dtype."""
    return triton_silu_and_mul(x) if _use_triton(x) else _act.silu_and_mul(x)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
           rotary_dim: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding, as RotaryEmbedding.forward.

    positions: int [T]; q: [T, num_heads, head_dim]; k: [T, num_kv_heads, head_dim] (views with a
    contiguous last dim are fine); cos_sin_cache: float32 [max_position, rotary_dim] = cos | sin.
    Returns new contiguous (q_rot, k_rot); dims past ``rotary_dim`` pass through unchanged.
    """
    if _use_triton(q):
        return triton_rotary(positions, q, k, cos_sin_cache, rotary_dim)
    rotary_dim = rotary_dim or q.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    return _rot.apply_rotary(q, cos, sin, rotary_dim), _rot.apply_rotary(k, cos, sin, rotary_dim)


# The kernels themselves, on any device Triton can run on.


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_launch(x, weight, eps, None)[0]


def triton_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, s = _rms_norm_launch(x, weight, eps, residual)
    return y, s


def triton_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = _rows(x)
    y = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0 and d > 0:
        block = min(triton.next_power_of_2(d), 2048)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, y, x2.stride(0), y.stride(0), D=d, BLOCK=block, num_warps=_warps(block))
    return y.view(*x.shape[:-1], d)


def triton_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                  rotary_dim: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim = q.shape[-1]
    rotary_dim = rotary_dim or head_dim
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary needs a contiguous last dim for q, k and cos_sin_cache")
    num_tokens, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    half = rotary_dim // 2
    if num_tokens > 0:
        _rotary_kernel[(num_tokens,)](
            positions, q, k, cos_sin_cache, qo, ko, cos_sin_cache.stride(0),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
            NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
            BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(head_dim),
            HAS_PASS=rotary_dim < head_dim, num_warps=4)
    return qo, ko
