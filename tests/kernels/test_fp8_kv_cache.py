"""An fp8 (e4m3) KV cache: the kernels store keys and values clamped to +-448 and rounded to e4m3,
and attend with them converted to the query's type. Checked against float64 attention over the
same keys and values rounded by torch's own float8_e4m3fn conversion, for the Triton kernels (on
the GPU: the Triton interpreter's float8 conversions round differently from the hardware's) and the
torch reference (everywhere), on ragged batches mixing prompts, prefill chunks and decodes, with
and without a sliding window and split decoding."""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.test_triton_attention import MIXED, TOL, make_case, reference
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.attention.triton_attn import TritonAttentionBackend

FP8 = torch.float8_e4m3fn


def as_fp8(x: torch.Tensor) -> torch.Tensor:
    """What an fp8 cache holds for ``x``: clamped to the finite range, then torch's own rounding."""
    return x.float().clamp(-448, 448).to(FP8)


def fp8_case(dtype: torch.dtype, block_size: int, seed: int):
    case = make_case(MIXED, block_size, 2, 2, 64, dtype, seed=seed, num_pad_tokens=1)
    # Some keys and values beyond e4m3's range: they must be clamped, not turned into NaN.
    case.key[0, 0, :4] = 1000.0
    case.value[1, 1, :4] = -900.0
    row = 0
    for i, (ctx, q_len) in enumerate(case.specs):
        case.full_k[i][ctx:] = case.key[row: row + q_len].double().cpu()
        case.full_v[i][ctx:] = case.value[row: row + q_len].double().cpu()
        row += q_len
    case.kv_cache = as_fp8(case.kv_cache)
    case.full_k = [as_fp8(k).double() for k in case.full_k]
    case.full_v = [as_fp8(v).double() for v in case.full_v]
    return case


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,splits", [(None, 1), (None, 4), (20, 1)])
def test_fp8_cache_matches_float64_over_the_rounded_values(backend_name, dtype, window, splits):
    if backend_name == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter's float8 conversions round differently from the GPU's")
    if backend_name == "torch" and splits > 1:
        pytest.skip("split decoding is a Triton plan")
    case = fp8_case(dtype, 16, seed=3)
    scale = 1.0 / math.sqrt(case.query.shape[-1])
    ref_cache = case.kv_cache.clone()
    if backend_name == "triton":
        backend = TritonAttentionBackend(prefill_block_m=16, tile_n=16)
        backend.decode_splits = lambda *a, **k: splits
    else:
        backend = TorchAttentionBackend()
    out = backend.forward(case.query, case.key, case.value, case.kv_cache, case.meta, scale, window)
    n = case.meta.num_actual_tokens
    want = reference(case, scale, window)[:n]
    got = out.double().cpu()[:n]
    assert torch.isfinite(got).all()
    assert ((got - want).abs() - TOL[dtype] * want.abs()).max().item() < TOL[dtype]
    # The cache holds exactly torch's e4m3 rounding of the clamped new keys and values.
    slots = case.meta.slot_mapping.cpu()
    flat = case.kv_cache.cpu().view(2, -1, 2, 64)
    valid = slots >= 0
    assert torch.equal(flat[0, slots[valid]].view(torch.uint8), as_fp8(case.key.cpu()[valid]).view(torch.uint8))
    assert torch.equal(flat[1, slots[valid]].view(torch.uint8), as_fp8(case.value.cpu()[valid]).view(torch.uint8))
    if backend_name == "triton":  # the torch reference writes the same bytes and gives the same output
        ref = TorchAttentionBackend().forward(case.query, case.key, case.value, ref_cache, case.meta, scale, window)
        ref = ref.double().cpu()[:n]
        assert ((ref - got).abs() - 2 * TOL[dtype] * ref.abs()).max().item() < 2 * TOL[dtype]
        assert torch.equal(ref_cache.view(torch.uint8).cpu(), case.kv_cache.view(torch.uint8).cpu())
