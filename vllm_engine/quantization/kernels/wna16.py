"""W4A16 / W8A16 linear: x [M, K] in 16-bit (or float32) times integer weights, dequantized inside the
kernel's tile (the bf16 weight is never written out).

The layout every integer format repacks to at load (GPTQ, compressed-tensors pack-quantized, AWQ):

* ``qweight`` int32 [K // pf, N], pf = 32 // bits: packed along K (GPTQ's layout): weight row k of
  column n sits in word ``k // pf``, bits ``(k % pf) * bits``.
* ``scales`` [G, N] in the activation dtype; the group of input row k is ``k // group_size``, or
  ``g_idx[k]`` when a ``g_idx`` [K] int32 is given (act-order checkpoints whose groups are not runs).
* ``zeros`` [G, N] (unsigned zero points, as floats) or None: the symmetric 2**(bits - 1);
  or ``mins`` [G, N] instead (GGUF's ``q * scale + min`` blocks);
* or, for non-uniform formats (SqueezeLLM), ``lut`` [N, 2**bits] instead of scales: ``w[k, n] = lut[n, q[k, n]]``.
* ``perm`` [K] or None: the input's columns are ``x[:, perm]`` first (act-order weights whose rows
  were sorted by group at load so that groups are runs again).

``w[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]`` (or ``q * scale + min``);  ``y = x[:, perm] @ w (+ bias)``.

Kernels: ``wna16_gemv`` (a few rows: each program streams BLOCK_N columns of the packed weight once)
and ``wna16_gemm`` (tl.dot on tiles dequantized in registers); ``wna16_dequantize`` writes the 16-bit
weight for cuBLAS (prefill-sized inputs). ``dequantize`` is the torch fallback (the CPU path). On CUDA the
``WNA16Picker`` (kernels/wna16_picker.py) times the tile configs per shape, as
``layers.triton_linear.LinearPicker`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    from vllm_engine.layers.pdl import pdl_prologue
except ImportError:  # CPU-only installs: the torch fallback serves every call
    triton = None

from vllm_engine import envs
from vllm_engine.layers import pdl

GEMV_MAX_ROWS = 4  # up to here the GEMV, above the tl.dot GEMM
MAX_KERNEL_ROWS = 256  # above: dequantize (one Triton kernel) and let cuBLAS multiply (prefill), untimed

# (BLOCK_N, BLOCK_K, num_warps, num_stages[, split_k]) for the GEMV, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
# for the GEMM. Split-K gives a batch-1 step more programs than column tiles (an 8B model's projections
# have 64-200 tiles of 32-64 columns for 132 SMs).
GEMV_CONFIGS = [(32, 128, 4, 3), (64, 128, 4, 3), (64, 256, 4, 3), (128, 128, 4, 3), (128, 256, 8, 3),
                (32, 512, 4, 2), (32, 256, 4, 3, 4), (64, 256, 4, 3, 4), (32, 256, 4, 3, 8), (64, 512, 8, 2, 8)]
GEMM_CONFIGS = [(16, 64, 64, 4, 4), (16, 128, 64, 4, 3), (32, 64, 64, 4, 4), (32, 128, 64, 4, 3),
                (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3),
                (16, 128, 64, 4, 3, "rows"), (32, 128, 64, 4, 3, "rows"), (64, 128, 64, 8, 3, "rows"),
                (128, 128, 64, 8, 3, "rows")]


@dataclass
class WNA16Weight:
    """One layer's packed weight in the layout above (tensors on the layer's device)."""

    qweight: torch.Tensor
    scales: Optional[torch.Tensor]  # None with a lookup table
    zeros: Optional[torch.Tensor]
    g_idx: Optional[torch.Tensor]
    perm: Optional[torch.Tensor]
    bits: int
    group_size: int  # == in_features for per-channel scales
    mins: Optional[torch.Tensor] = None  # w = q * scale + min (zeros then None)
    lut: Optional[torch.Tensor] = None  # [N, 2**bits]: w = lut[n, q] (scales, zeros, mins then None)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * (32 // self.bits)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def groups(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """The group of each input row [K] (after ``perm``), int64."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=device or self.qweight.device) // self.group_size


def dequantize(w: WNA16Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [K, N] weight (rows in ``perm`` order, as the kernels see them) in ``dtype``, computed in float32."""
    shifts = torch.arange(0, 32, w.bits, dtype=torch.int32, device=w.qweight.device)
    q = ((w.qweight.unsqueeze(1) >> shifts[None, :, None]) & ((1 << w.bits) - 1)).flatten(0, 1)
    if w.lut is not None:
        cols = torch.arange(w.out_features, device=q.device)
        return w.lut.float()[cols[None, :], q.long()].to(dtype)
    q = q.float()
    g = w.groups()
    if w.mins is not None:
        return (q * w.scales.float()[g] + w.mins.float()[g]).to(dtype)
    zero = w.zeros.float()[g] if w.zeros is not None else float(1 << (w.bits - 1))
    return ((q - zero) * w.scales.float()[g]).to(dtype)


if triton is not None:

    @triton.jit
    def _wna16_tile(QW, S, Z, GI, k0, offs_n, nmask, N, K, group_size, BITS: tl.constexpr,
                    HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_MINS: tl.constexpr, HAS_LUT: tl.constexpr, WORD_PER_ROW: tl.constexpr = False):
        """Rows [k0, k0 + BLOCK_K) x columns offs_n of the dequantized weight, float32 [BLOCK_K, BLOCK_N].
        Each packed word is loaded once and split in registers into a [BLOCK_K / PF, PF, BLOCK_N]
        tile reshaped to rows; or (WORD_PER_ROW) every row loads its own word (the PF rows of a
        word read it from L1) and shifts out its value, no reshape. Without g_idx the tile lies in
        one group (the launcher makes BLOCK_K divide group_size), so one row of scales serves it."""
        PF: tl.constexpr = 32 // BITS
        if WORD_PER_ROW:
            rows = k0 + tl.arange(0, BLOCK_K)
            m2 = (rows < K)[:, None] & nmask[None, :]
            packed = tl.load(QW + (rows // PF)[:, None].to(tl.int64) * N + offs_n[None, :], mask=m2, other=0)
            q = (packed >> ((rows % PF) * BITS)[:, None]) & ((1 << BITS) - 1)
        else:
            offs_kp = k0 // PF + tl.arange(0, BLOCK_K // PF)
            m2 = (offs_kp < K // PF)[:, None] & nmask[None, :]
            packed = tl.load(QW + offs_kp[:, None].to(tl.int64) * N + offs_n[None, :], mask=m2, other=0)
            shifts = tl.arange(0, PF) * BITS
            q = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))
        if HAS_LUT or HAS_GIDX:  # a table or a group per row
            offs_k = k0 + tl.arange(0, BLOCK_K)
            return _wna16_values(S, Z, GI, q, offs_k, offs_k < K, offs_n, nmask, N, BITS, HAS_ZEROS, HAS_MINS,
                                 HAS_LUT)
        q = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # q exactly, without an int-to-float unit op
        g = k0 // group_size
        s = tl.load(S + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        if HAS_MINS:
            m = tl.load(Z + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
            w = q * s[None, :] + m[None, :]
        elif HAS_ZEROS:
            z = tl.load(Z + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
            w = (q - z[None, :]) * s[None, :]
        else:
            w = (q - (1 << (BITS - 1))) * s[None, :]
        return w

    @triton.jit
    def _gemv_x_at(X, R, G, ResOut, row, k, mask, K, stride_xm, stride_rm, stride_om, write_res,
                   ADD_NORM: tl.constexpr, SILU_MUL: tl.constexpr):
        """The GEMV's input at (row, k) for vectors of both, float32, and (x + r)^2 for the norm's sum of
        squares. Plain: x. SILU_MUL: x is [gate | up] (2K columns), the input silu(gate) * up rounded
        as ``fused_ops.silu_and_mul`` rounds it. ADD_NORM: (x + r) rounded to x's dtype (stored to
        ResOut by ``write_res``) times the norm weight g; the caller scales the result by 1 / RMS."""
        x = tl.load(X + row * stride_xm + k, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        sq = tl.zeros_like(xf)
        if SILU_MUL:
            up = tl.load(X + row * stride_xm + K + k, mask=mask, other=0.0)
            s = (xf / (1.0 + tl.exp(-xf))).to(X.dtype.element_ty).to(tl.float32)  # F.silu rounds here
            xf = (s * up.to(tl.float32)).to(X.dtype.element_ty).to(tl.float32)
        if ADD_NORM:
            r = tl.load(R + row * stride_rm + k, mask=mask, other=0.0)
            h = (xf + r.to(tl.float32)).to(X.dtype.element_ty)
            if write_res:
                tl.store(ResOut + row * stride_om + k, h, mask=mask)
            hf = h.to(tl.float32)
            sq = hf * hf
            xf = hf * tl.load(G + k, mask=mask, other=0.0).to(tl.float32)
        return xf, sq

    @triton.jit
    def _wna16_gemv_kernel(X, QW, S, Z, GI, Bias, Y, R, G, ResOut, M, N, K, group_size, stride_xm, stride_ym,
                           stride_rm, stride_om, eps, k_per_split, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                           HAS_GIDX: tl.constexpr, HAS_MINS: tl.constexpr, HAS_LUT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, ADD_NORM: tl.constexpr, SILU_MUL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT_K: tl.constexpr, PDL: tl.constexpr):
        """Grid (cdiv(N, BLOCK_N), SPLIT_K): y[m, n] = sum_k x[m, k] * w[k, n] (+ bias[n]) for M <= BLOCK_M
        rows (x as ``_gemv_x_at`` gives it). Program (p, s) streams the packed columns
        [p * BLOCK_N, (p + 1) * BLOCK_N) of the inputs [s * k_per_split, (s + 1) * k_per_split) once.

        The tile is the packed words [BLOCK_K / PF, BLOCK_N] (PF = 32 / BITS values each), one
        accumulator row per (input row, packed row): each value is masked out of its word in the
        thread that loaded it and made a float by the 2**23 exponent trick (``_in_place_value``: no
        shift, no int-to-float conversion, whose unit runs at a quarter rate), multiplied with x
        scaled to its bit position, float32 accumulation; the zero point, scale and min apply once
        per word (a word's values share a group unless g_idx is read per value), and the rows are
        reduced once at the end. With SPLIT_K > 1 the partial sums
        are added atomically into Y (float32, zeroed by the caller)."""
        pdl_prologue(PDL)
        PF: tl.constexpr = 32 // BITS
        BLOCK_KP: tl.constexpr = BLOCK_K // PF
        ROWS: tl.constexpr = BLOCK_M * BLOCK_KP
        PER_WORD: tl.constexpr = not HAS_GIDX and not HAS_LUT  # scale, zero / min per packed word
        LOW: tl.constexpr = 23 // BITS  # a word's values 0 .. LOW - 1 lie below bit 23 where they are
        pid = tl.program_id(0)
        k_start = tl.program_id(1) * k_per_split
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_r = tl.arange(0, ROWS)
        row = offs_r // BLOCK_KP  # the input row each accumulator row serves
        word = offs_r % BLOCK_KP
        rmask = row < M
        write_res = pid == 0
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        ss = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            kp = k0 // PF + word
            kpmask = kp < K // PF
            wmask = kpmask[:, None] & nmask[None, :]
            packed = tl.load(QW + kp[:, None].to(tl.int64) * N + offs_n[None, :], mask=wmask, other=0)
            if PER_WORD:
                g = (kp * PF) // group_size
                sc = tl.load(S + g[:, None].to(tl.int64) * N + offs_n[None, :], mask=wmask, other=0.0).to(tl.float32)
                if HAS_ZEROS or HAS_MINS:  # Z holds the zero points, or the mins
                    zm = tl.load(Z + g[:, None].to(tl.int64) * N + offs_n[None, :], mask=wmask, other=0.0)
                high = packed >> (LOW * BITS)  # the values that do not fit in place, moved down
            part = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            xsum = tl.zeros([ROWS], dtype=tl.float32)
            for j in tl.static_range(PF):
                k = kp * PF + j
                xj, sq = _gemv_x_at(X, R, G, ResOut, row, k, rmask & kpmask, K, stride_xm, stride_rm, stride_om,
                                    write_res, ADD_NORM, SILU_MUL)
                if ADD_NORM:
                    ss += sq
                if PER_WORD:
                    # The value masked in place, at bit jj * BITS below 2**23: or-ing in the exponent of
                    # 2**23 and subtracting 2**23 gives q * 2**(jj * BITS) exactly; x scaled by the
                    # inverse power of 2 (exact) makes the product x * q.
                    if j < LOW:
                        v = _in_place_value(packed, j, BITS)
                        part += (xj * (1.0 / (1 << (j * BITS))))[:, None] * v
                    else:
                        v = _in_place_value(high, j - LOW, BITS)
                        part += (xj * (1.0 / (1 << ((j - LOW) * BITS))))[:, None] * v
                    xsum += xj
                else:
                    q = (packed >> (j * BITS)) & ((1 << BITS) - 1)
                    part += xj[:, None] * _wna16_values(S, Z, GI, q, k, kpmask, offs_n, nmask, N, BITS,
                                                        HAS_ZEROS, HAS_MINS, HAS_LUT)
            if PER_WORD:  # part = sum x q over the word's values: the zero point, scale and min per word
                if HAS_ZEROS:
                    part = (part - xsum[:, None] * zm.to(tl.float32)) * sc
                elif HAS_MINS:
                    part = part * sc + xsum[:, None] * zm.to(tl.float32)
                else:
                    part = (part - xsum[:, None] * (1 << (BITS - 1))) * sc
            acc += part
        out = tl.sum(tl.reshape(acc, (BLOCK_M, BLOCK_KP, BLOCK_N)), axis=1)
        offs_m = tl.arange(0, BLOCK_M)
        mmask = offs_m < M
        if ADD_NORM:
            ss_m = tl.sum(tl.reshape(ss, (BLOCK_M, BLOCK_KP)), axis=1)
            out = out * tl.math.rsqrt(ss_m / K + eps)[:, None]
        if HAS_BIAS:
            bias = tl.load(Bias + offs_n, mask=nmask, other=0.0).to(tl.float32)
            out += tl.where(k_start == 0, bias, 0.0)[None, :]
        dst = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(dst, out.to(Y.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
        else:
            tl.atomic_add(dst, out, mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _in_place_value(words, j: tl.constexpr, BITS: tl.constexpr):
        """Value j of each word kept at its bits (j * BITS + BITS <= 23), as the float q * 2**(j * BITS):
        one and-or (the mask, and the exponent of 2**23) and one subtraction, no shift."""
        bits = (words & (((1 << BITS) - 1) << (j * BITS))) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _wna16_values(S, Z, GI, q, k, kmask, offs_n, nmask, N, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      HAS_MINS: tl.constexpr, HAS_LUT: tl.constexpr):
        """Weights [rows of k, BLOCK_N] of the values q at input rows k, each read with its own group
        (g_idx) or lookup table: the GEMV's, GEMM's and dequantization's path for those layouts."""
        m2 = kmask[:, None] & nmask[None, :]
        if HAS_LUT:  # S is the [N, 2**BITS] table
            return tl.load(S + offs_n[None, :].to(tl.int64) * (1 << BITS) + q, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(GI + k, mask=kmask, other=0)
        s = tl.load(S + g[:, None].to(tl.int64) * N + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # q exactly (no int-to-float op)
        if HAS_MINS:
            return qf * s + tl.load(Z + g[:, None].to(tl.int64) * N + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            return (qf - tl.load(Z + g[:, None].to(tl.int64) * N + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)) * s
        return (qf - (1 << (BITS - 1))) * s

    @triton.jit
    def _wna16_gemm_kernel(X, QW, S, Z, GI, Bias, Y, M, N, K, group_size, stride_xm, stride_ym,
                           BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr,
                           HAS_MINS: tl.constexpr, HAS_LUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WORD_PER_ROW: tl.constexpr,
                           PDL: tl.constexpr):
        """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)): y = x @ w (+ bias), each weight tile dequantized in
        registers to x's dtype (``_wna16_tile``, WORD_PER_ROW its unpacking) and multiplied on tensor
        cores, float32 accumulation."""
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
            kmask = (k0 + offs_k) < K
            a = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + k0 + offs_k[None, :],
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = _wna16_tile(QW, S, Z, GI, k0, offs_n, nmask, N, K, group_size, BITS, HAS_ZEROS, HAS_GIDX,
                            BLOCK_K, BLOCK_N, HAS_MINS, HAS_LUT, WORD_PER_ROW)
            if DOT_F32:
                a = a.to(tl.float32)
            else:
                w = w.to(X.dtype.element_ty)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


    @triton.jit
    def _wna16_dequant_kernel(QW, S, Z, GI, Out, N, K, group_size, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                              HAS_GIDX: tl.constexpr, HAS_MINS: tl.constexpr, HAS_LUT: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Grid (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N)): Out [K, N] = the dequantized weight, in Out's dtype."""
        k0 = tl.program_id(0) * BLOCK_K
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        nmask = offs_n < N
        w = _wna16_tile(QW, S, Z, GI, k0, offs_n, nmask, N, K, group_size, BITS, HAS_ZEROS, HAS_GIDX,
                        BLOCK_K, BLOCK_N, HAS_MINS, HAS_LUT)
        tl.store(Out + offs_k[:, None].to(tl.int64) * N + offs_n[None, :], w.to(Out.dtype.element_ty),
                 mask=(offs_k < K)[:, None] & nmask[None, :])


def wna16_dequantize(w: WNA16Weight, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize`` in one Triton kernel: the [K, N] weight (rows in ``perm`` order) in ``dtype``,
    computed in float32 (prefill-sized inputs on CUDA multiply it with cuBLAS)."""
    k, n = w.in_features, w.out_features
    out = torch.empty(k, n, dtype=dtype, device=w.qweight.device)
    block_k, block_n = _block_k(w, 64), 128
    s = w.lut if w.lut is not None else w.scales
    z = w.mins if w.mins is not None else w.zeros if w.zeros is not None else s
    _wna16_dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        w.qweight, s, z, w.g_idx if w.g_idx is not None else w.qweight, out, n, k, w.group_size, BITS=w.bits,
        HAS_ZEROS=w.zeros is not None, HAS_GIDX=w.g_idx is not None, HAS_MINS=w.mins is not None,
        HAS_LUT=w.lut is not None, BLOCK_K=block_k, BLOCK_N=block_n)
    return out


def _block_k(w: WNA16Weight, block_k: int) -> int:
    """The K tile: at most the group (so that a tile has one row of scales) unless g_idx is read per row."""
    if w.g_idx is None and w.group_size < w.in_features:
        block_k = min(block_k, w.group_size)
    return max(block_k, 32 // w.bits, 16)


def _prepare(x: torch.Tensor, w: WNA16Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with its columns in ``perm`` order and unit stride, the empty [M, N] output)."""
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"wna16: x {tuple(x.shape)} does not match a weight of {w.in_features} inputs")
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    elif x.stride(-1) != 1:
        x = x.contiguous()
    return x, torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)


def _common_args(x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor], y: torch.Tensor) -> tuple:
    s = w.lut if w.lut is not None else w.scales
    z = w.mins if w.mins is not None else w.zeros if w.zeros is not None else s
    gi = w.g_idx if w.g_idx is not None else w.qweight
    return (x, w.qweight, s, z, gi, bias if bias is not None else s, y, x.shape[0], w.out_features,
            w.in_features, w.group_size, x.stride(0), y.stride(0))


def wna16_gemv(x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor] = None,
               config: tuple = (64, 256, 4, 3)) -> torch.Tensor:
    """x [M, K] (M <= GEMV_MAX_ROWS) -> [M, N] in x.dtype. ``config``: (BLOCK_N, BLOCK_K, num_warps,
    num_stages[, split_k]): with split_k > 1 the inputs are split over that many programs per column
    tile (more programs for a batch-1 step), their partial sums added into a float32 buffer.
    More rows go to ``wna16_gemm``."""
    if x.shape[0] > GEMV_MAX_ROWS:
        raise ValueError(f"wna16_gemv takes at most {GEMV_MAX_ROWS} rows, got {x.shape[0]}: use wna16_gemm")
    x, y = _prepare(x, w)
    return launch_gemv(x, w, bias, y, config)


def launch_gemv(x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor], y: torch.Tensor, config: tuple,
                silu_mul: bool = False, norm: Optional[tuple] = None) -> torch.Tensor:
    """One ``_wna16_gemv_kernel`` launch writing y [M, N] (x already in ``perm`` order); ``silu_mul`` /
    ``norm`` = (residual, norm weight, residual out, eps) fold the op before the product
    (kernels/wna16_fused.py; no split-K then: each program needs all of K for the RMS)."""
    if x.shape[0] == 0:
        return y
    block_n, block_k, warps, stages = config[:4]
    split_k = config[4] if len(config) > 4 else 1
    if split_k > 1 and (silu_mul or norm is not None):
        raise ValueError("wna16 GEMV: a folded op cannot split K")
    block_k = max(block_k, 32 // w.bits)
    k_per_split = triton.cdiv(triton.cdiv(w.in_features, split_k), block_k) * block_k
    out = y if split_k == 1 else torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    residual, norm_weight, res_out, eps = norm if norm is not None else (x, x, x, 0.0)
    s = w.lut if w.lut is not None else w.scales
    z = w.mins if w.mins is not None else w.zeros if w.zeros is not None else s
    _wna16_gemv_kernel[(triton.cdiv(w.out_features, block_n), split_k)](
        x, w.qweight, s, z, w.g_idx if w.g_idx is not None else w.qweight, bias if bias is not None else s, out,
        residual, norm_weight, res_out, x.shape[0], w.out_features, w.in_features, w.group_size, x.stride(0),
        out.stride(0), residual.stride(0), res_out.stride(0), eps, k_per_split, BITS=w.bits,
        HAS_ZEROS=w.zeros is not None, HAS_GIDX=w.g_idx is not None, HAS_MINS=w.mins is not None,
        HAS_LUT=w.lut is not None, HAS_BIAS=bias is not None, ADD_NORM=norm is not None, SILU_MUL=silu_mul,
        BLOCK_M=max(triton.next_power_of_2(x.shape[0]), 1), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=warps, num_stages=stages, **pdl.launch_args(x.device))
    if split_k > 1:
        y.copy_(out)
    return y


def wna16_gemm(x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor] = None,
               config: tuple = (32, 64, 64, 4, 4)) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype. ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[,
    "rows"]): with "rows" each weight row loads its own packed word (``_wna16_tile``'s WORD_PER_ROW)."""
    x, y = _prepare(x, w)
    if x.shape[0] == 0:
        return y
    block_m, block_n, block_k, warps, stages = config[:5]
    # The interpreter's 16-bit dot is wrong: multiply in float32 there (as layers/triton_linear.py does).
    dot_f32 = x.dtype == torch.float32 or envs.triton_interpret()
    _wna16_gemm_kernel[(triton.cdiv(w.out_features, block_n), triton.cdiv(x.shape[0], block_m))](
        *_common_args(x, w, bias, y), BITS=w.bits, HAS_ZEROS=w.zeros is not None, HAS_GIDX=w.g_idx is not None,
        HAS_MINS=w.mins is not None, HAS_LUT=w.lut is not None, HAS_BIAS=bias is not None, DOT_F32=dot_f32,
        DOT_PREC="ieee" if dot_f32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(w, block_k),
        WORD_PER_ROW=config[5:] == ("rows",), num_warps=warps, num_stages=stages, **pdl.launch_args(x.device))
    return y


def dequant_linear(x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor] = None,
                   use_triton: Optional[bool] = None) -> torch.Tensor:
    """The whole weight dequantized to x's dtype (``wna16_dequantize`` on CUDA, torch ops elsewhere or
    with ``use_triton=False``), then one matmul: the CPU path, and prefill-sized inputs on CUDA."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    if use_triton is None:
        use_triton = triton is not None and x.is_cuda
    weight = wna16_dequantize(w, x.dtype) if use_triton else dequantize(w, x.dtype)
    return F.linear(x, weight.t(), bias)
