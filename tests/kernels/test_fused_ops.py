"""Fused Triton ops vs float64 computations (and the torch layers they replace)."""

from __future__ import annotations

import pytest
import torch

from vllm_engine.layers import fused_ops
from vllm_engine.layers.layernorm import rms_norm as torch_rms_norm
from vllm_engine.layers.rotary import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Allowed error relative to |value| (a couple of units in the last place of the dtype) + an abs floor.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_f64(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    err = (got - want).abs()
    bound = RTOL[dtype] * (want.abs() + 1e-2)
    assert (err <= bound).all(), f"max err {err.max().item()}, at {(err - bound).argmax().item()}"


def rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    eps = 1e-6
    big = rand(5, 200, dtype=dtype, seed=0)
    x = big[:, 8:104]  # rows with a stride: no copy needed, hidden 96 (not a power of 2)
    w = (1 + 0.1 * rand(96, dtype=torch.float32, seed=1)).to(dtype)
    y = fused_ops.triton_rms_norm(x, w, eps)
    assert y.shape == x.shape and y.dtype == dtype
    xd = x.double()
    want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    assert_close_f64(y, want, dtype)
    # Same rounding points as the torch layer: at most one ulp apart.
    assert_close_f64(y, torch_rms_norm(x, w, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype):
    eps = 1e-5
    x = rand(2, 3, 64, dtype=dtype, seed=2)
    r = rand(2, 3, 64, dtype=dtype, seed=3)
    w = rand(64, dtype=dtype, seed=4)
    x_before, r_before = x.clone(), r.clone()
    y, new_res = fused_ops.triton_fused_add_rms_norm(x, r, w, eps)
    assert y.shape == new_res.shape == x.shape
    # The sum is rounded to x.dtype exactly as torch's x + residual. (The CPU interpreter rounds
    # fp32 -> bf16 toward zero, unlike the GPU's round-to-nearest-even: allow that one ulp there.)
    if DEVICE == "cuda" or dtype != torch.bfloat16:
        assert torch.equal(new_res, x + r)
    else:
        assert ((new_res.double() - (x + r).double()).abs() <= 2**-7 * (x + r).double().abs()).all()
    s = (x + r).double()
    want = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    assert_close_f64(y, want, dtype)
    assert torch.equal(x, x_before) and torch.equal(r, r_before), "inputs must be left alone"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [80, 2100])  # 2100: several column programs per row
def test_silu_and_mul(dtype, d):
    x = rand(3, 2 * d, dtype=dtype, seed=5) * 3
    y = fused_ops.triton_silu_and_mul(x)
    assert y.shape == (3, d) and y.dtype == dtype
    g, u = x[:, :d].double(), x[:, d:].double()
    assert_close_f64(y, g * torch.sigmoid(g) * u, dtype)


def test_cpu_tensors_dispatch_to_torch():
    """The public ops send CPU tensors to the torch layers (even with the interpreter on), so CPU
    models in the same test session are unaffected; CUDA tensors go to the kernels."""
    x, w = torch.randn(3, 32).bfloat16(), torch.randn(32).bfloat16()
    assert torch.equal(fused_ops.rms_norm(x, w, 1e-6), torch_rms_norm(x, w, 1e-6))
    y, s = fused_ops.fused_add_rms_norm(x, x, w, 1e-6)
    want_y, want_s = torch_rms_norm(x, w, 1e-6, x)
    assert torch.equal(y, want_y) and torch.equal(s, want_s)
    gu = torch.randn(2, 16).bfloat16()
    assert torch.equal(fused_ops.silu_and_mul(gu), torch.nn.functional.silu(gu[:, :8]) * gu[:, 8:])


def _f64_norm_rope(x: torch.Tensor, w, eps: float, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """float64 reference of per-head RMSNorm (when w is given) then neox rotary: x [T, H, D]."""
    x = x.double()
    if w is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm,head_dim,rotary_dim,heads,kv_heads", [
    (True, 64, 64, 4, 2),     # Qwen3-style: per-head q/k norm, GQA
    (False, 64, 64, 4, 4),    # Llama MHA
    (False, 32, 16, 6, 1),    # partial rotary, MQA, head counts that are not powers of 2
    (True, 48, 32, 3, 3),     # norm + partial rotary, head_dim not a power of 2
])
def test_qkv_rope_cache(dtype, qk_norm, head_dim, rotary_dim, heads, kv_heads):
    eps, num_tokens, block_size, num_blocks = 1e-6, 7, 4, 6
    rot = RotaryEmbedding(head_dim, 64, 10000.0, None, rotary_dim)
    cs = rot.cos_sin_cache.to(DEVICE)
    qkv = rand(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=40)
    positions = torch.tensor([0, 5, 9, 33, 63, 1, 2], device=DEVICE)
    slots = torch.tensor([3, 8, -1, 23, 0, 17, 12], device=DEVICE)  # -1: padding, nothing written
    qw = (1 + 0.1 * rand(head_dim, dtype=torch.float32, seed=41)).to(dtype) if qk_norm else None
    kw = (1 + 0.1 * rand(head_dim, dtype=torch.float32, seed=42)).to(dtype) if qk_norm else None
    sentinel = 7.0
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), sentinel, dtype=dtype, device=DEVICE)
    q = fused_ops.triton_qkv_rope_cache(positions, qkv, heads, kv_heads, cs, rotary_dim, qw, kw, eps, cache, slots)
    assert q.shape == (num_tokens, heads, head_dim) and q.dtype == dtype and q.is_contiguous()

    cos, sin = cs.cpu().index_select(0, positions.cpu()).chunk(2, dim=-1)
    qh, kh, vh = qkv.cpu().split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    want_q = _f64_norm_rope(qh.reshape(num_tokens, heads, head_dim), qw.cpu() if qw is not None else None,
                            eps, cos, sin, rotary_dim)
    want_k = _f64_norm_rope(kh.reshape(num_tokens, kv_heads, head_dim), kw.cpu() if kw is not None else None,
                            eps, cos, sin, rotary_dim)
    want_v = vh.reshape(num_tokens, kv_heads, head_dim).double()
    # Two roundings (norm, then rotary) in 16-bit dtypes: allow two ulps.
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}[dtype]

    def close(got, want):
        # Relative to the value and to its head's RMS (rotation mixes two values of that size: a
        # result near zero can carry the rounding error of its inputs).
        err = (got.double().cpu() - want).abs()
        scale = want.abs() + want.pow(2).mean(-1, keepdim=True).sqrt()
        assert (err <= tol * scale).all(), f"max err {err.max().item()}"

    close(q, want_q)
    flat = cache.view(2, num_blocks * block_size, kv_heads, head_dim).cpu()
    written = set()
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        written.add(s)
        close(flat[0, s], want_k[i])
        assert torch.equal(flat[1, s].double(), want_v[i])
    untouched = [s for s in range(num_blocks * block_size) if s not in written]
    assert (flat[:, untouched] == sentinel).all(), "a slot outside slot_mapping was written"

    # The torch composition (the CPU path) agrees with the kernel.
    cache2 = torch.full_like(cache, sentinel)
    q2 = fused_ops.torch_qkv_rope_cache(positions, qkv, heads, kv_heads, cs, rotary_dim, qw, kw, eps, cache2, slots)
    close(q2, want_q)
    flat2 = cache2.view(2, num_blocks * block_size, kv_heads, head_dim).cpu()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            close(flat2[0, s], want_k[i])
            assert torch.equal(flat2[1, s], flat[1, s])
    assert (flat2[:, untouched] == sentinel).all()

