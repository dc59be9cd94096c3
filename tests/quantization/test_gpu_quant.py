"""On a CUDA GPU (skipped elsewhere): the quantized kernels at a real model's shapes (Llama-3.1-8B's
projections) against float64, through the pickers as the engine calls them, and tiny quantized
checkpoints through the whole engine (CUDA graphs) against HF on the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_engine_vs_hf import hf_greedy
from tests.quantization.conftest import hf_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LLAMA_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@pytest.mark.parametrize("layer", sorted(LLAMA_8B))
@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False)])
def test_wna16_at_llama_8b_shapes(layer, bits, act_order):
    from vllm_engine.quantization.kernels.wna16 import WNA16Weight
    from vllm_engine.quantization.kernels.wna16_picker import WNA16Picker
    from vllm_engine.quantization.utils import pack_int32

    n, k = LLAMA_8B[layer]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randint(0, 1 << bits, (k, n), device="cuda", generator=gen)
    scales = (torch.rand(k // 128, n, device="cuda", generator=gen) * 0.01).bfloat16()
    zeros = torch.randint(0, 1 << bits, (k // 128, n), device="cuda", generator=gen).bfloat16()
    perm = torch.randperm(k, device="cuda", generator=gen) if act_order else None
    w = WNA16Weight(pack_int32(q, bits, 0), scales, zeros, None, perm, bits, 128)
    ref = (q.double() - zeros.double()[torch.arange(k, device="cuda") // 128]) * scales.double()[
        torch.arange(k, device="cuda") // 128]
    picker = WNA16Picker()
    for rows in (1, 16, 64, 300):
        x = torch.randn(rows, k, device="cuda", generator=gen).bfloat16()
        xs = x[:, perm] if perm is not None else x
        want = xs.double() @ ref
        got = picker(x, w).double()
        err = (got - want).abs().max() / want.abs().max()
        assert err < 2e-2, (rows, float(err), picker.decisions)


@pytest.mark.parametrize("layer", ["gate_up", "down"])
def test_every_wna16_kernel_config_at_llama_8b_shapes(layer):
    """Not only the picker's choice: every GEMV config (1 and 3 rows, split-K too), the folded
    norm / activation GEMVs, and every GEMM config (16 and 48 rows) against float64, W4 with zero
    points in bf16 (the path the picker may take on another GPU)."""
    from vllm_engine.quantization.kernels import wna16 as k
    from vllm_engine.quantization.kernels.wna16_fused import wna16_add_norm_gemv, wna16_silu_mul_gemv
    from vllm_engine.quantization.utils import pack_int32

    n, kk = LLAMA_8B[layer]
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randint(0, 16, (kk, n), device="cuda", generator=gen)
    scales = (torch.rand(kk // 128, n, device="cuda", generator=gen) * 0.01).bfloat16()
    zeros = torch.randint(0, 16, (kk // 128, n), device="cuda", generator=gen).bfloat16()
    w = k.WNA16Weight(pack_int32(q, 4, 0), scales, zeros, None, None, 4, 128)
    g = torch.arange(kk, device="cuda") // 128
    ref = (q.double() - zeros.double()[g]) * scales.double()[g]

    def check(got, want, what):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 2e-2, (what, float(err))

    for rows in (1, 3):
        x = torch.randn(rows, kk, device="cuda", generator=gen).bfloat16()
        for config in k.GEMV_CONFIGS:
            check(k.wna16_gemv(x, w, config=config), x.double() @ ref, ("gemv", rows, config))
    x = torch.randn(1, kk, device="cuda", generator=gen).bfloat16()
    r, gain = torch.randn_like(x), (1 + 0.1 * torch.randn(kk, device="cuda", generator=gen)).bfloat16()
    h = (x.double() + r.double())
    h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * gain.double()
    gate_up = torch.randn(1, 2 * kk, device="cuda", generator=gen).bfloat16()
    act = torch.nn.functional.silu(gate_up[:, :kk].double()) * gate_up[:, kk:].double()
    for config in [c for c in k.GEMV_CONFIGS if len(c) == 4]:
        check(wna16_add_norm_gemv(x, r, gain, 1e-6, w, config=config)[0], h @ ref, ("add_norm", config))
        check(wna16_silu_mul_gemv(gate_up, w, config=config), act @ ref, ("silu_mul", config))
    for rows in (16, 48):
        x = torch.randn(rows, kk, device="cuda", generator=gen).bfloat16()
        for config in k.GEMM_CONFIGS:
            check(k.wna16_gemm(x, w, config=config), x.double() @ ref, ("gemm", rows, config))


@pytest.mark.parametrize("layer", sorted(LLAMA_8B))
def test_fp8_at_llama_8b_shapes(layer):
    from vllm_engine.quantization.fp8 import fp8_linear, quantize_weight_per_channel, scaled_mm_supported
    from vllm_engine.quantization.kernels.fp8_block import fp8_block_linear

    n, k = LLAMA_8B[layer]
    w = torch.randn(n, k, device="cuda").bfloat16() * 0.02
    wq, ws = quantize_weight_per_channel(w)
    x = torch.randn(16, k, device="cuda").bfloat16()
    want = fp8_linear(x.float(), wq, ws).double()  # the float32 path: the same arithmetic
    got = fp8_linear(x, wq, ws, use_scaled_mm=scaled_mm_supported(x.device)).double()
    assert ((got - want).abs().max() / want.abs().max()) < 2e-2
    block_scales = torch.rand(n, k // 128, device="cuda") * 1e-3 + 1e-4
    want = fp8_block_linear(x.float(), wq, block_scales, 128, use_triton=False).double()
    got = fp8_block_linear(x, wq, block_scales, 128).double()
    assert ((got - want).abs().max() / want.abs().max()) < 2e-2


@pytest.mark.parametrize("enforce_eager", [True, False])
@pytest.mark.parametrize("case", [(4, 32, True, False, "gptq"), (4, 128, False, True, "gptq")],
                         ids=["act-order", "folded-norm-and-act"])
def test_gptq_engine_on_gpu_matches_hf(enforce_eager, case, gptq_checkpoint, float_checkpoint):
    """float32 on the GPU (the Triton GEMV/GEMM through the picker, the norm and activation folded into
    the GEMV where measured faster and the weight has no input permutation, CUDA graphs when not eager):
    greedy tokens equal HF's on the dequantized weights."""
    from vllm_engine import Engine, SamplingParams

    path, weights = gptq_checkpoint(*case)
    hf = hf_reference(float_checkpoint, weights)
    engine = Engine(model=str(path), dtype="float32", device="cuda", max_model_len=128, enforce_eager=enforce_eager)
    ids = [engine.tokenize(p) for p in ("Hello, my name is", "The capital of France is", "One two three")]
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for prompt_ids, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt_ids, 10)[0]
    engine.shutdown()


def test_smollm2_gguf_kept_quantized_on_gpu(smollm2_gguf):
    """The SmolLM2 Q4_1 GGUF kept quantized (the W4A16 kernels with scales and mins, float32) gives the
    dequantize-at-load path's greedy tokens on the GPU, with CUDA graphs."""
    from tests.models.test_smollm2_gguf import PROMPTS
    from vllm_engine import Engine, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    tokens = {}
    for quantization in (None, "gguf"):
        engine = Engine(model=str(smollm2_gguf), quantization=quantization, dtype="float32", device="cuda",
                        max_model_len=256)
        tokens[quantization] = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]
        engine.shutdown()
    assert tokens["gguf"] == tokens[None]
