"""Per-layer KV cache scales for an fp8 (e4m3) cache: keys stored as k / k_scale and values as
v / v_scale (clamped to +-448), read back multiplied by their scale.

Keys and values here reach +-1000, beyond e4m3's range: with the scales honoured they fit (and are
stored to e4m3's precision), without them they would be clamped and every check below would fail.

* The torch reference (any machine) against float64 attention over the dequantized cache.
* The Triton kernels' reads (the interpreter on the CPU, compiled on the GPU) against the same
  float64 attention, on a cache filled by torch's own float8 rounding. Their writes are checked
  against themselves at scale 1 on pre-divided inputs (byte for byte), since the interpreter's
  float8 conversion rounds differently from torch's and the GPU's (test_fp8_kv_cache.py); on the
  GPU also against torch's rounding.
* A checkpoint's ``self_attn.k_scale`` / ``v_scale`` reach each layer, and a tiny model with an fp8
  cache and its scales gives the float cache's logits.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.kernels.test_attention_soft_cap import capped_reference
from tests.kernels.test_triton_attention import DEVICE, MIXED, TOL, make_case
from vllm_engine.attention import triton_kernels as K
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.attention.triton_attn import TritonAttentionBackend

FP8 = torch.float8_e4m3fn
K_SCALE, V_SCALE = 2.75, 3.5  # +-1000 / scale within +-448
VALUE_RANGE = 1000.0  # keys and values in +-VALUE_RANGE; errors are measured in it (TOL is for unit values)


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """What an fp8 cache holds for ``x``: x * (1 / scale) in float32, clamped, torch's rounding."""
    return (x.float() * (1.0 / scale)).clamp(-448, 448).to(FP8)


def dequantize(c: torch.Tensor, scale: float) -> torch.Tensor:
    return c.double() * scale


def scaled_case(dtype: torch.dtype, seed: int, cache_new_tokens: bool):
    """A ragged batch (prompts, prefill chunks, decodes) whose keys and values reach +-1000; the cache
    holds the prefixes quantized (and this step's tokens too when ``cache_new_tokens``); ``full_k`` /
    ``full_v`` are every position's dequantized values (float64)."""
    case = make_case(MIXED, 16, 2, 2, 64, dtype, seed=seed, num_pad_tokens=1)
    g = torch.Generator().manual_seed(seed + 100)
    row = 0
    for i, (ctx, q_len) in enumerate(case.specs):
        seq_len = ctx + q_len
        big_k = ((torch.rand(seq_len, 2, 64, generator=g) * 2 - 1) * VALUE_RANGE).to(dtype)
        big_v = ((torch.rand(seq_len, 2, 64, generator=g) * 2 - 1) * VALUE_RANGE).to(dtype)
        case.key[row: row + q_len] = big_k[ctx:].to(DEVICE)
        case.value[row: row + q_len] = big_v[ctx:].to(DEVICE)
        case.full_k[i], case.full_v[i] = big_k, big_v
        row += q_len
    case.kv_cache = quantize(case.kv_cache, 1.0)  # junk in unused slots, as an fp8 cache would hold
    flat = case.kv_cache.view(2, -1, 2, 64)
    for i, (ctx, q_len) in enumerate(case.specs):
        bt = case.meta.block_tables[i].cpu()
        pos = [int(bt[p // 16]) * 16 + p % 16 for p in range(ctx + q_len)]
        for p in range(ctx + q_len if cache_new_tokens else ctx):
            flat[0, pos[p]] = quantize(case.full_k[i][p], K_SCALE).to(DEVICE)
            flat[1, pos[p]] = quantize(case.full_v[i][p], V_SCALE).to(DEVICE)
        case.full_k[i] = dequantize(quantize(case.full_k[i], K_SCALE), K_SCALE)
        case.full_v[i] = dequantize(quantize(case.full_v[i], V_SCALE), V_SCALE)
    return case


def reference(case, scale: float, window, cap) -> torch.Tensor:
    """float64 attention over ``full_k`` / ``full_v`` (optionally windowed and soft-capped)."""
    return capped_reference(case, scale, cap, window)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(got).all()
    got, want = got / VALUE_RANGE, want / VALUE_RANGE
    err = ((got - want).abs() - tol * want.abs()).max().item()  # absolute + relative, as test_triton_attention
    assert err < tol, f"max error beyond tolerance: {err}"


def scores_scale(case) -> float:
    # Keys of ~500 give q.k in the thousands: a small scale keeps the softmax from being one-hot.
    return 1.0 / (math.sqrt(case.query.shape[-1]) * 400)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,cap", [(None, None), (20, None), (None, 5.0)])
def test_torch_backend_writes_scaled_values_and_attends_like_float64(dtype, window, cap):
    case = scaled_case(dtype, seed=1, cache_new_tokens=False)
    scale = scores_scale(case)
    out = TorchAttentionBackend().forward(case.query, case.key, case.value, case.kv_cache, case.meta, scale,
                                          window, cap, k_scale=K_SCALE, v_scale=V_SCALE)
    n = case.meta.num_actual_tokens
    assert_close(out.double().cpu()[:n], reference(case, scale, window, cap)[:n], TOL[dtype])
    slots = case.meta.slot_mapping.cpu()
    valid = slots >= 0
    flat = case.kv_cache.cpu().view(2, -1, 2, 64)
    key, value = case.key.cpu()[valid], case.value.cpu()[valid]
    assert torch.equal(flat[0, slots[valid]].view(torch.uint8), quantize(key, K_SCALE).view(torch.uint8))
    assert torch.equal(flat[1, slots[valid]].view(torch.uint8), quantize(value, V_SCALE).view(torch.uint8))
    # Stored to e4m3's precision (3 mantissa bits: half an ulp is 1/16 relative), not clamped.
    back = dequantize(flat[0, slots[valid]], K_SCALE)
    assert ((back - key.double()).abs() <= key.double().abs() / 16 + 1e-2).all()


def test_scales_are_ignored_by_a_bfloat16_cache():
    case = make_case(MIXED, 16, 2, 2, 64, torch.bfloat16, seed=2, num_pad_tokens=1)
    cache = case.kv_cache.clone()
    scale = 1.0 / math.sqrt(64)
    with_scales = TorchAttentionBackend().forward(case.query, case.key, case.value, case.kv_cache, case.meta,
                                                  scale, k_scale=K_SCALE, v_scale=V_SCALE)
    without = TorchAttentionBackend().forward(case.query, case.key, case.value, cache, case.meta, scale)
    assert torch.equal(with_scales, without) and torch.equal(case.kv_cache, cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,splits,cap", [(None, 1, None), (None, 4, None), (20, 1, None), (None, 2, 5.0)])
def test_triton_reads_scaled_cache_like_float64(dtype, window, splits, cap):
    """Both kernels (prefill chunks and split decodes) over a cache torch filled, K/V already cached."""
    case = scaled_case(dtype, seed=3, cache_new_tokens=True)
    scale = scores_scale(case)
    backend = TritonAttentionBackend(prefill_block_m=16, tile_n=16)
    backend.decode_splits = lambda *a, **k: splits
    out = backend.forward(case.query, None, None, case.kv_cache, case.meta, scale, window, cap,
                          k_scale=K_SCALE, v_scale=V_SCALE)
    n = case.meta.num_actual_tokens
    want = reference(case, scale, window, cap)[:n]
    assert_close(out.double().cpu()[:n], want, TOL[dtype])
    ref = TorchAttentionBackend().forward(case.query, None, None, case.kv_cache, case.meta, scale, window, cap,
                                          k_scale=K_SCALE, v_scale=V_SCALE)
    assert_close(ref.double().cpu()[:n], want, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cache_write_divides_by_the_scales(dtype):
    """reshape_and_cache with scales == at scale 1 on x * (1 / scale) (float32), byte for byte; on the
    GPU also == torch's rounding."""
    g = torch.Generator().manual_seed(4)
    key = ((torch.rand(9, 2, 64, generator=g) * 2 - 1) * VALUE_RANGE).to(dtype).to(DEVICE)
    value = ((torch.rand(9, 2, 64, generator=g) * 2 - 1) * VALUE_RANGE).to(dtype).to(DEVICE)
    slots = torch.tensor([3, 17, -1, 40, 0, 63, 21, 22, 5], dtype=torch.int64, device=DEVICE)
    scaled = torch.zeros(2, 4, 16, 2, 64, dtype=FP8, device=DEVICE)
    plain = scaled.clone()
    K.reshape_and_cache(key, value, scaled, slots, K_SCALE, V_SCALE)
    K.reshape_and_cache(key.float() * (1.0 / K_SCALE), value.float() * (1.0 / V_SCALE), plain, slots)
    assert torch.equal(scaled.view(torch.uint8), plain.view(torch.uint8))
    flat = scaled.view(2, -1, 2, 64)
    ok = slots >= 0
    assert scaled.view(torch.uint8).count_nonzero() > 0 and (flat[:, 2 * 16 + 4].view(torch.uint8) == 0).all()
    if DEVICE == "cuda":
        assert torch.equal(flat[0, slots[ok]].view(torch.uint8), quantize(key[ok], K_SCALE).view(torch.uint8))
        assert torch.equal(flat[1, slots[ok]].view(torch.uint8), quantize(value[ok], V_SCALE).view(torch.uint8))


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_fused_rope_cache_write_divides_by_the_scales(path):
    """The fused q/k rotary + cache write: with power-of-two scales (exact divisions, which commute
    with the rotary's rounding), writing with scales == writing k / k_scale, v / v_scale at scale 1."""
    from vllm_engine.layers import fused_ops
    from vllm_engine.layers.rotary import RotaryEmbedding

    fn = fused_ops.triton_qkv_rope_cache if path == "triton" else fused_ops.torch_qkv_rope_cache
    heads, kv_heads, d, t = 4, 2, 32, 7
    k_scale, v_scale = 4.0, 8.0
    g = torch.Generator().manual_seed(5)
    qkv = (torch.randn(t, (heads + 2 * kv_heads) * d, generator=g) * 300).to(torch.bfloat16).to(DEVICE)
    cos_sin = RotaryEmbedding(d, 64, 10000.0, None, d).cos_sin_cache.to(DEVICE)
    positions = torch.arange(3, 3 + t, device=DEVICE)
    slots = torch.tensor([1, 5, 9, -1, 30, 31, 2], dtype=torch.int64, device=DEVICE)
    pre = qkv.clone()
    pre[:, heads * d: (heads + kv_heads) * d] /= k_scale
    pre[:, (heads + kv_heads) * d:] /= v_scale
    scaled = torch.zeros(2, 2, 16, kv_heads, d, dtype=FP8, device=DEVICE)
    plain = scaled.clone()
    q1 = fn(positions, qkv, heads, kv_heads, cos_sin, None, None, None, 0.0, scaled, slots,
            k_scale, v_scale)
    q2 = fn(positions, pre, heads, kv_heads, cos_sin, None, None, None, 0.0, plain, slots)
    assert torch.equal(q1, q2)
    assert torch.equal(scaled.view(torch.uint8), plain.view(torch.uint8))
    written = plain.view(2, -1, kv_heads, d)[:, slots[slots >= 0]].view(torch.uint8)
    assert written.count_nonzero() > written.numel() // 2
    # and the values are not clamped: |k| reaches ~1000 before the division by 4
    assert scaled.float().abs().max() < 448 and qkv[:, heads * d:].float().abs().max() > 448


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter's float8 rounding differs from torch's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_write_and_read_match_float64_on_the_gpu(dtype):
    case = scaled_case(dtype, seed=6, cache_new_tokens=False)
    scale = scores_scale(case)
    backend = TritonAttentionBackend(prefill_block_m=16, tile_n=16)
    out = backend.forward(case.query, case.key, case.value, case.kv_cache, case.meta, scale,
                          k_scale=K_SCALE, v_scale=V_SCALE)
    n = case.meta.num_actual_tokens
    assert_close(out.double().cpu()[:n], reference(case, scale, None, None)[:n], TOL[dtype])


def checkpoint_with_scales(src, dst, scales: dict[str, torch.Tensor], v_factor: float = 1.0) -> str:
    """A copy of the tiny checkpoint ``src`` with the extra tensors ``scales`` and its value
    projections multiplied by ``v_factor``."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    for name in tensors:
        if name.endswith("v_proj.weight"):
            tensors[name] = tensors[name] * v_factor
    save_file({**tensors, **scales}, str(dst / "model.safetensors"))
    return str(dst)


def layer_scales(num_layers: int, k_scale, v_scale) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(num_layers):
        out[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k_scale(i), dtype=torch.float32)
        out[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([v_scale(i)], dtype=torch.float32)
    return out


def load_tiny(path: str, **kw):
    from vllm_engine.config import EngineArgs
    from vllm_engine.model_loader import get_model

    cfg = EngineArgs(model=path, dtype="float32", device="cpu", max_model_len=64, **kw).create_engine_config()
    return get_model(cfg.model, torch.device("cpu"), TorchAttentionBackend()), cfg


def test_checkpoint_scales_reach_each_attention_layer(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    _, cfg = load_tiny(str(src))
    n = cfg.model.hf_config.num_hidden_layers
    path = checkpoint_with_scales(src, tmp_path / "scaled", layer_scales(n, lambda i: 0.5 + i, lambda i: 3.0 * (i + 1)))
    model, _ = load_tiny(path, kv_cache_dtype="fp8")
    for i, layer in enumerate(model.model.layers):
        assert (layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale) == (0.5 + i, 3.0 * (i + 1))
    plain, _ = load_tiny(str(src))
    assert all((layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale) == (1.0, 1.0)
               for layer in plain.model.layers)


@pytest.mark.parametrize("extra,match", [
    ({"model.layers.0.self_attn.k_scale": torch.tensor([1.0, 2.0])}, "k_scale has shape \\(2,\\)"),
    ({"model.layers.1.self_attn.v_scale": torch.tensor(-2.0)}, "v_scale is -2.0"),
    ({"model.layers.0.self_attn.v_scale": torch.tensor(float("inf"))}, "v_scale is inf"),
    ({"model.layers.99.self_attn.k_scale": torch.tensor(1.0)}, "layers.99.self_attn.k_scale.*no attention layer"),
])
def test_unusable_scales_are_refused_naming_the_tensor(tiny_model_dir, tmp_path, extra, match):
    path = checkpoint_with_scales(tiny_model_dir("llama"), tmp_path / "bad", extra)
    with pytest.raises(ValueError, match=match):
        load_tiny(path)


def test_fp8_cache_with_checkpoint_scales_stays_close_to_the_float_cache(tiny_model_dir, tmp_path):
    """Value projections 4000x the tiny model's put V far beyond e4m3's +-448: with the checkpoint's
    v_scale (and a k_scale that makes the cached keys 20x the real ones) the fp8 cache's log-probs
    stay within e4m3's precision of the float cache's; at scale 1 (no scales in the checkpoint)
    the clamped values cost nats."""
    from vllm_engine import Engine, SamplingParams

    src = tiny_model_dir("llama")
    n = load_tiny(str(src))[1].model.hf_config.num_hidden_layers
    big = checkpoint_with_scales(src, tmp_path / "big", {}, v_factor=4000.0)
    scaled = checkpoint_with_scales(src, tmp_path / "scaled", layer_scales(n, lambda i: 0.05, lambda i: 32.0),
                                    v_factor=4000.0)
    prompts = ["Hello, my name is", "The capital of France is a city that"]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    kw = dict(dtype="float32", max_model_len=128, seed=0, block_size=4, num_gpu_blocks_override=64)

    def logprobs(path: str, **extra) -> list[float]:
        outs = Engine(model=path, **kw, **extra).generate(prompts, params, use_tqdm=False)
        return [d[t].logprob for o in outs for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]

    want = logprobs(big)
    with_scales = [abs(a - b) for a, b in zip(logprobs(scaled, kv_cache_dtype="fp8"), want)]
    without = [abs(a - b) for a, b in zip(logprobs(big, kv_cache_dtype="fp8"), want)]
    assert max(with_scales) < 0.25 and sum(with_scales) / len(with_scales) < 0.05
    assert max(without) > 1.0 and sum(without) / len(without) > 0.2


def compressed_tensors_with_kv_scheme(tmp_path, strategy: str = "tensor") -> tuple[str, dict[str, float]]:
    """An FP8 W8A8 checkpoint written by the compressed-tensors library, given a ``kv_cache_scheme``
    (the library's own QuantizationArgs, serialized as it writes them) and per-layer
    ``self_attn.k_scale`` / ``v_scale``, as llm-compressor saves a calibrated KV cache. (The library's
    KV-cache hooks do not recognise transformers 5's attention modules, so the scales are added
    here.) Returns (directory, {scale name: value})."""
    pytest.importorskip("compressed_tensors")
    import json

    from compressed_tensors.quantization import QuantizationArgs

    from tests.quantization.conftest import build_float_checkpoint, write_compressed_tensors_fp8

    out = tmp_path / "ct"
    write_compressed_tensors_fp8(build_float_checkpoint(tmp_path / "float"), out, per_channel=True, static=False)
    cfg = json.loads((out / "config.json").read_text())
    kv = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=False)
    cfg["quantization_config"]["kv_cache_scheme"] = kv.model_dump(mode="json")
    (out / "config.json").write_text(json.dumps(cfg))
    scales = {}
    for i in range(cfg["num_hidden_layers"]):
        scales[f"model.layers.{i}.self_attn.k_scale"] = 0.125 * (i + 1)
        scales[f"model.layers.{i}.self_attn.v_scale"] = 2.0 + i
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(str(shard))
    save_file({**tensors, **{k: torch.tensor([v]) for k, v in scales.items()}}, str(shard))
    return str(out), scales


def test_compressed_tensors_kv_cache_scheme_scales_are_loaded(tmp_path):
    path, scales = compressed_tensors_with_kv_scheme(tmp_path)
    model, _ = load_tiny(path, kv_cache_dtype="fp8")
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn.attn
        assert attn.k_scale == scales[f"model.layers.{i}.self_attn.k_scale"]
        assert attn.v_scale == scales[f"model.layers.{i}.self_attn.v_scale"]


def test_compressed_tensors_per_head_kv_scales_are_refused(tmp_path):
    path, _ = compressed_tensors_with_kv_scheme(tmp_path, strategy="attn_head")
    with pytest.raises(ValueError, match="kv_cache_scheme.strategy='attn_head'"):
        load_tiny(path, kv_cache_dtype="fp8")
