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

    from vllm_engine.attention.triton_kernels import to_cache_value
    from vllm_engine.layers.pdl import pdl_prologue
except ImportError:  # CPU-only installs: the torch versions serve every call
    triton = None

from vllm_engine.layers import pdl
from vllm_engine.layers.parallel_compile import launch


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
                         N: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """One program per row of N: (optional x + r rounded to x's dtype -> ResOut), then RMS norm.
        N is a constexpr (a model constant) so masks fold away and accesses stay 16-byte vectors."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)  # a weight: before the PDL wait
        pdl_prologue(PDL)
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(ResOut + row * stride_ro + offs, x, mask=mask)
        h = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(h * h, 0) / N + eps)
        hn = (h * rstd).to(X.dtype.element_ty).to(tl.float32)  # rounded like h.to(orig_dtype)
        tl.store(Y + row * stride_y + offs, (w * hn).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(X, Y, stride_x, stride_y, D: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Grid (rows, cdiv(D, BLOCK)): y = silu(gate) * up with gate = x[:D], up = x[D:]."""
        pdl_prologue(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        g = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty).to(tl.float32)  # F.silu rounds here
        tl.store(Y + row * stride_y + offs, (s * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_and_mul_kernel(X, Y, stride_x, stride_y, D: tl.constexpr, BLOCK: tl.constexpr, TANH: tl.constexpr,
                             PDL: tl.constexpr):
        """Grid (rows, cdiv(D, BLOCK)): y = gelu(gate) * up (gate = x[:D], up = x[D:]); gelu's tanh
        approximation, 0.5 g (1 + tanh z) = g / (1 + e^-2z) (no cancellation in either tail), or the
        erf form; rounded as F.gelu rounds it."""
        pdl_prologue(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        g = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
        if TANH:
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) (g + 0.044715 g^3)
            a = g / (1.0 + tl.math.exp(-2.0 * z))
        else:
            a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = a.to(X.dtype.element_ty).to(tl.float32)
        tl.store(Y + row * stride_y + offs, (a * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _cos_sin(Pos, CosSin, t, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """cos and sin [1, BLOCK_HALF] (float32) of token t's position, from the cos | sin cache rows."""
        pos = tl.load(Pos + t).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_HALF)[None, :]
        cmask = offs_r < HALF
        cos = tl.load(CosSin + pos * stride_cs + offs_r, mask=cmask, other=0.0).to(tl.float32)
        sin = tl.load(CosSin + pos * stride_cs + HALF + offs_r, mask=cmask, other=0.0).to(tl.float32)
        return cos, sin

    @triton.jit
    def _head_group(Src, t, stride_t, cos, sin, NormW, eps, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_PASS: tl.constexpr, HAS_NORM: tl.constexpr):
        """Loads the [NUM_HEADS, HEAD_DIM] heads of token t (rows HEAD_DIM apart from Src + t * stride_t),
        optionally RMS-normalises each head (rounded like layernorm.rms_norm), and rotates them
        (rounded like rotary.apply_rotary). Returns (first half, second half, pass-through part)."""
        offs_h = tl.arange(0, BLOCK_H)[:, None]
        offs_r = tl.arange(0, BLOCK_HALF)[None, :]
        offs_d = tl.arange(0, BLOCK_D)[None, :]
        mask = (offs_h < NUM_HEADS) & (offs_r < HALF)
        pmask = (offs_h < NUM_HEADS) & (offs_d >= 2 * HALF) & (offs_d < HEAD_DIM)
        src = Src + t * stride_t + offs_h * HEAD_DIM
        x1 = tl.load(src + offs_r, mask=mask, other=0.0)
        x2 = tl.load(src + HALF + offs_r, mask=mask, other=0.0)
        xp = x1  # unused unless HAS_PASS
        if HAS_PASS:
            xp = tl.load(src + offs_d, mask=pmask, other=0.0)
        dt = x1.dtype
        if HAS_NORM:
            h1 = x1.to(tl.float32)
            h2 = x2.to(tl.float32)
            ss = tl.sum(h1 * h1, 1) + tl.sum(h2 * h2, 1)
            if HAS_PASS:
                hp = xp.to(tl.float32)
                ss += tl.sum(hp * hp, 1)
            rstd = tl.math.rsqrt(ss / HEAD_DIM + eps)[:, None]
            w1 = tl.load(NormW + offs_r, mask=offs_r < HALF, other=0.0).to(tl.float32)
            w2 = tl.load(NormW + HALF + offs_r, mask=offs_r < HALF, other=0.0).to(tl.float32)
            x1 = (w1 * (h1 * rstd).to(dt).to(tl.float32)).to(dt)
            x2 = (w2 * (h2 * rstd).to(dt).to(tl.float32)).to(dt)
            if HAS_PASS:
                wp = tl.load(NormW + offs_d, mask=(offs_d >= 2 * HALF) & (offs_d < HEAD_DIM), other=0.0)
                xp = (wp.to(tl.float32) * (hp * rstd).to(dt).to(tl.float32)).to(dt)
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        return (f1 * cos - f2 * sin).to(dt), (f2 * cos + f1 * sin).to(dt), xp

    @triton.jit
    def _qkv_rope_cache_kernel(QKV, Pos, CosSin, QNormW, KNormW, QOut, KCache, VCache, Slots,
                               stride_t, stride_cs, stride_qo, stride_cb, stride_ct, stride_ch, eps,
                               inv_k_scale, inv_v_scale,
                               NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                               HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                               BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, HAS_PASS: tl.constexpr,
                               HAS_NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_FP8: tl.constexpr,
                               PDL: tl.constexpr):
        """One program per token of the fused qkv row [q heads | k heads | v heads]: q and k are
        (normalised and) rotated; q goes to QOut, k and v to the token's slot of the paged cache
        (slot < 0: padding, nothing written; an fp8 cache: times 1 / k_scale or 1 / v_scale and
        clamped to its range first)."""
        t = tl.program_id(0).to(tl.int64)
        # Positions and slots are step metadata and the cos/sin cache a constant: read before the PDL wait.
        cos, sin = _cos_sin(Pos, CosSin, t, stride_cs, HALF, BLOCK_HALF)
        slot = tl.load(Slots + t).to(tl.int64)
        pdl_prologue(PDL)
        offs_r = tl.arange(0, BLOCK_HALF)[None, :]
        cmask = offs_r < HALF
        offs_d = tl.arange(0, BLOCK_D)[None, :]

        q1, q2, qp = _head_group(QKV, t, stride_t, cos, sin, QNormW, eps, NUM_Q_HEADS, HEAD_DIM, HALF, BLOCK_HQ,
                                 BLOCK_HALF, BLOCK_D, HAS_PASS, HAS_NORM)
        offs_hq = tl.arange(0, BLOCK_HQ)[:, None]
        mq = (offs_hq < NUM_Q_HEADS) & cmask
        dst = QOut + t * stride_qo + offs_hq * HEAD_DIM + offs_r
        tl.store(dst, q1.to(QOut.dtype.element_ty), mask=mq)
        tl.store(dst + HALF, q2.to(QOut.dtype.element_ty), mask=mq)
        if HAS_PASS:
            tl.store(QOut + t * stride_qo + offs_hq * HEAD_DIM + offs_d, qp.to(QOut.dtype.element_ty),
                     mask=(offs_hq < NUM_Q_HEADS) & (offs_d >= 2 * HALF) & (offs_d < HEAD_DIM))

        if slot >= 0:
            k_src = QKV + NUM_Q_HEADS * HEAD_DIM
            k1, k2, kp = _head_group(k_src, t, stride_t, cos, sin, KNormW, eps, NUM_KV_HEADS, HEAD_DIM, HALF,
                                     BLOCK_HK, BLOCK_HALF, BLOCK_D, HAS_PASS, HAS_NORM)
            offs_hk = tl.arange(0, BLOCK_HK)[:, None]
            mk = (offs_hk < NUM_KV_HEADS) & cmask
            base = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + offs_hk * stride_ch
            tl.store(KCache + base + offs_r, to_cache_value(k1, KCache, KV_FP8, inv_k_scale), mask=mk)
            tl.store(KCache + base + HALF + offs_r, to_cache_value(k2, KCache, KV_FP8, inv_k_scale), mask=mk)
            mfull = (offs_hk < NUM_KV_HEADS) & (offs_d < HEAD_DIM)
            if HAS_PASS:
                tl.store(KCache + base + offs_d, to_cache_value(kp, KCache, KV_FP8, inv_k_scale),
                         mask=mfull & (offs_d >= 2 * HALF))
            v = tl.load(k_src + NUM_KV_HEADS * HEAD_DIM + t * stride_t + offs_hk * HEAD_DIM + offs_d, mask=mfull)
            tl.store(VCache + base + offs_d, to_cache_value(v, VCache, KV_FP8, inv_v_scale), mask=mfull)




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
        launch(
            _rms_norm_kernel, (x2.shape[0],),
            x2, r2, weight, y, res_out, x2.stride(0), r2.stride(0), y.stride(0), res_out.stride(0), eps,
            N=n, HAS_RES=residual is not None, BLOCK=block, num_warps=_warps(block), **pdl.launch_args(x.device))
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


def gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """x: [..., 2 * d] holding [gate, up] -> gelu(gate, approximate) * up: [..., d] in x.dtype."""
    return triton_gelu_and_mul(x, approximate) if _use_triton(x) else _act.gelu_and_mul(x, approximate)


def qkv_rope_cache(positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                   cos_sin_cache: torch.Tensor, rotary_dim: Optional[int], q_norm_weight: Optional[torch.Tensor],
                   k_norm_weight: Optional[torch.Tensor], eps: float, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Everything between the qkv projection and attention, in one pass per token.

    qkv: [T, (num_heads + 2 * num_kv_heads) * head_dim] (q | k | v heads); optional per-head RMSNorm of
    q and k (Qwen3), neox rotary of q and k, and the rotated k and v written into the paged
    ``kv_cache`` [2, blocks, block_size, kv_heads, head_dim] at ``slot_mapping`` (-1: not written;
    an fp8 cache gets k / k_scale and v / v_scale). Returns q: [T, num_heads, head_dim], contiguous.
    """
    if _use_triton(qkv):
        return triton_qkv_rope_cache(positions, qkv, num_heads, num_kv_heads, cos_sin_cache, rotary_dim,
                                     q_norm_weight, k_norm_weight, eps, kv_cache, slot_mapping, k_scale, v_scale)
    return torch_qkv_rope_cache(positions, qkv, num_heads, num_kv_heads, cos_sin_cache, rotary_dim,
                                q_norm_weight, k_norm_weight, eps, kv_cache, slot_mapping, k_scale, v_scale)


def torch_qkv_rope_cache(positions, qkv, num_heads, num_kv_heads, cos_sin_cache, rotary_dim, q_norm_weight,
                         k_norm_weight, eps, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    """The same as composed torch ops (the reference, and the CPU path)."""
    from vllm_engine.attention.torch_ref import write_kv_to_cache

    t, head_dim = qkv.shape[0], kv_cache.shape[-1]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(t, num_heads, head_dim)
    k = k.reshape(t, num_kv_heads, head_dim)
    v = v.reshape(t, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q = _ln.rms_norm(q, q_norm_weight, eps)
        k = _ln.rms_norm(k, k_norm_weight, eps)
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    rotary_dim = rotary_dim or head_dim
    q, k = _rot.apply_rotary(q, cos, sin, rotary_dim), _rot.apply_rotary(k, cos, sin, rotary_dim)
    write_kv_to_cache(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    return q.contiguous()


# The kernels themselves, on any device Triton can run on.




def triton_qkv_rope_cache(positions, qkv, num_heads, num_kv_heads, cos_sin_cache, rotary_dim, q_norm_weight,
                          k_norm_weight, eps, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    head_dim = kv_cache.shape[-1]
    rotary_dim = rotary_dim or head_dim
    if qkv.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("qkv_rope_cache needs a contiguous last dim for qkv, cos_sin_cache and kv_cache")
    if qkv.shape[-1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv has {qkv.shape[-1]} columns, expected {(num_heads + 2 * num_kv_heads) * head_dim}")
    num_tokens = qkv.shape[0]
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if slot_mapping.shape[0] < num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {num_tokens} tokens")
    kc, vc = kv_cache[0], kv_cache[1]
    half = rotary_dim // 2
    has_norm = q_norm_weight is not None
    if num_tokens > 0:
        launch(
            _qkv_rope_cache_kernel, (num_tokens,),
            qkv, positions, cos_sin_cache, q_norm_weight if has_norm else qkv, k_norm_weight if has_norm else qkv,
            q_out, kc, vc, slot_mapping, qkv.stride(0), cos_sin_cache.stride(0), q_out.stride(0),
            kc.stride(0), kc.stride(1), kc.stride(2), eps, 1.0 / k_scale, 1.0 / v_scale,
            NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
            BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(head_dim),
            HAS_PASS=rotary_dim < head_dim, HAS_NORM=has_norm, BLOCK_SIZE=kv_cache.shape[2],
            KV_FP8=kv_cache.dtype == torch.float8_e4m3fn, num_warps=4,
            **pdl.launch_args(qkv.device))
    return q_out


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
        launch(
            _silu_and_mul_kernel, (x2.shape[0], triton.cdiv(d, block)),
            x2, y, x2.stride(0), y.stride(0), D=d, BLOCK=block, num_warps=_warps(block), **pdl.launch_args(x.device))
    return y.view(*x.shape[:-1], d)


def triton_gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = _rows(x)
    y = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0 and d > 0:
        block = min(triton.next_power_of_2(d), 2048)
        launch(
            _gelu_and_mul_kernel, (x2.shape[0], triton.cdiv(d, block)),
            x2, y, x2.stride(0), y.stride(0), D=d, BLOCK=block, TANH=approximate == "tanh", num_warps=_warps(block),
            **pdl.launch_args(x.device))
    return y.view(*x.shape[:-1], d)
