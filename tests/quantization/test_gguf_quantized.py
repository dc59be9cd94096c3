"""GGUF blocks kept quantized (``quantization="gguf"``): the block decoders against the ``gguf`` package's
own dequantization, a fused layer of mixed block types (and its tensor-parallel slices) against the
dequantized product, and the real SmolLM2 Q4_1 file giving the dequantize-at-load path's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_engine.distributed import override_parallel_state
from vllm_engine.layers.linear import QKVParallelLinear
from vllm_engine.quantization.gguf import GGUF_BLOCKS, GGUFConfig, decode_blocks
from vllm_engine.quantization.kernels.wna16 import dequantize

# Byte offsets of each type's float16 fields (d, and m / dmin where present).
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """[rows, bytes per row] of random blocks with finite, small float16 scales."""
    block_values, block_bytes = GGUF_BLOCKS[type_name][:2]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block_values, block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        d = rng.uniform(-0.02, 0.02, size=raw.shape[0]).astype(np.float16)
        raw[:, off: off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def gguf_reference(raw: np.ndarray, type_name: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType[type_name]).astype(np.float64))


@pytest.mark.parametrize("type_name", sorted(GGUF_BLOCKS))
def test_decoded_groups_match_the_gguf_package(type_name):
    raw = random_blocks(type_name, 4, 512, seed=1)
    q, scales, mins = decode_blocks(torch.from_numpy(raw), type_name, (4, 512))
    group, bits = GGUF_BLOCKS[type_name][2:4]
    assert int(q.max()) < (1 << bits) and scales.shape == (4, 512 // group)
    w = q.double() * scales.double().repeat_interleave(group, 1) + mins.double().repeat_interleave(group, 1)
    torch.testing.assert_close(w, gguf_reference(raw, type_name), rtol=1e-6, atol=1e-7)


def _raw_tensor(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    t = torch.from_numpy(raw)
    t.gguf_type, t.gguf_shape = type_name, shape
    return t


@pytest.mark.parametrize("tp_size", [1, 2])
def test_fused_layer_of_mixed_block_types(tp_size):
    """q and k in Q4_K, v in Q6_K (as Q4_K_M files mix them): one layer of 8-bit values in groups of 16;
    each rank's product is x times its rows of the dequantized q | k | v."""
    hidden, head, heads, kv_heads = 256, 32, 4, 2
    types = {"q": "Q4_K", "k": "Q4_K", "v": "Q6_K"}
    rows = {"q": heads * head, "k": kv_heads * head, "v": kv_heads * head}
    raws = {s: random_blocks(types[s], rows[s], hidden, seed=i) for i, s in enumerate("qkv")}
    config = GGUFConfig({f"layers.0.self_attn.{s}_proj.weight": t for s, t in types.items()})
    x = torch.randn(3, hidden, dtype=torch.float64)
    for rank in range(tp_size):
        with override_parallel_state(rank, tp_size, 0, 1):
            layer = QKVParallelLinear(hidden, head, heads, kv_heads, bias=False, params_dtype=torch.float32,
                                      quant_config=config, prefix="layers.0.self_attn.qkv_proj")
        for s in "qkv":
            layer.weight.weight_loader(layer.weight, _raw_tensor(raws[s], types[s], (rows[s], hidden)), s)
        layer.quant_method.process_weights_after_loading(layer)
        assert (layer.wna16.bits, layer.wna16.group_size) == (8, 16) and not hasattr(layer, "gguf_scales")
        want = []
        for s in "qkv":
            n = rows[s] // tp_size
            want.append(gguf_reference(raws[s], types[s])[rank * n: (rank + 1) * n])
        torch.testing.assert_close(dequantize(layer.wna16, torch.float64).t(), torch.cat(want), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer(x.float()).double(), x @ torch.cat(want).t(), rtol=1e-4, atol=2e-4)


def test_quantization_gguf_needs_a_gguf_file(float_checkpoint):
    from vllm_engine.config import EngineArgs

    with pytest.raises(ValueError, match="quantization='gguf' needs a GGUF file"):
        EngineArgs(model=str(float_checkpoint), quantization="gguf", device="cpu").create_engine_config()


@pytest.mark.slow
def test_smollm2_q4_1_kept_quantized_gives_the_dequantized_tokens(smollm2_gguf):
    """The real SmolLM2-135M Q4_1 file: every decoder linear kept as 4-bit groups of 32 with scales and
    mins, and greedy tokens equal to the dequantize-at-load path's on the SmolLM2 tests' prompts."""
    from tests.models.test_smollm2_gguf import PROMPTS
    from vllm_engine import Engine, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for quantization in (None, "gguf"):
        engine = Engine(model=str(smollm2_gguf), quantization=quantization, dtype="float32", device="cpu",
                        max_model_len=256)
        if quantization == "gguf":
            model = engine.model_runner.model
            layers = [m for m in model.modules() if hasattr(m, "wna16")]
            assert len(layers) == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down
            assert all((m.wna16.bits, m.wna16.group_size, m.weight if hasattr(m, "weight") else None) ==
                       (4, 32, None) for m in layers)
        outputs[quantization] = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]
        engine.shutdown()
    assert outputs["gguf"] == outputs[None]


def test_methods_a_gguf_file_takes():
    """Unset (dequantized at load), gguf (kept quantized), fp8 (the dequantized weights quantized at load);
    a method that needs its own checkpoint layout is refused."""
    from types import SimpleNamespace

    from vllm_engine.quantization import resolve_quantization

    cfg = SimpleNamespace()  # GGUF configs carry no quantization_config
    assert [resolve_quantization(q, cfg, "gguf") for q in (None, "gguf", "fp8")] == [None, "gguf", "fp8"]
    with pytest.raises(ValueError, match="quantization='gptq' cannot be applied to a GGUF file"):
        resolve_quantization("gptq", cfg, "gguf")
