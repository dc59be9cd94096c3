"""AWQ checkpoints in AutoAWQ's GEMM layout (packed here from its description: interleaved nibble order,
tests/quantization/conftest.py): logits and greedy tokens against HF on the dequantized weights, each
tensor-parallel rank's share, modules left unquantized, and refused settings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.e2e.test_engine_vs_hf import hf_greedy
from tests.quantization.conftest import hf_reference, write_awq
from tests.quantization.test_gptq import CPU, LENS, SCHEDULE, _rank_slice, model_config
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.distributed import override_parallel_state
from vllm_engine.layers.linear import LinearBase
from vllm_engine.model_loader import get_model
from vllm_engine.quantization.kernels.wna16 import dequantize
from vllm_engine.quantization.unquantized import UnquantizedLinearMethod


@pytest.fixture(scope="module")
def awq_checkpoint(float_checkpoint, tmp_path_factory):
    built = {}

    def make(group_size, skip=None):
        key = (group_size, tuple(skip or ()))
        if key not in built:
            out = tmp_path_factory.mktemp("awq")
            built[key] = (out, write_awq(float_checkpoint, out, group_size, skip))
        return built[key]

    return make


@pytest.mark.parametrize("group_size", [128, 32, -1])
def test_logits_match_hf_on_dequantized_weights(group_size, awq_checkpoint, float_checkpoint, paged_vs_hf):
    path, weights = awq_checkpoint(group_size)
    cfg = model_config(path)
    assert cfg.quantization == "awq"
    model = get_model(cfg, CPU, TorchAttentionBackend())
    paged_vs_hf(model, cfg, hf_reference(float_checkpoint, weights), LENS, SCHEDULE, tol=2e-4)


def test_modules_to_not_convert_stay_unquantized(awq_checkpoint, float_checkpoint, paged_vs_hf):
    path, weights = awq_checkpoint(64, ["mlp"])
    cfg = model_config(path)
    model = get_model(cfg, CPU, TorchAttentionBackend())
    assert isinstance(model.model.layers[1].mlp.down_proj.quant_method, UnquantizedLinearMethod)
    assert hasattr(model.model.layers[1].self_attn.qkv_proj, "wna16")
    paged_vs_hf(model, cfg, hf_reference(float_checkpoint, weights), LENS, SCHEDULE, tol=2e-4)


def test_engine_greedy_tokens_equal_hf(awq_checkpoint, float_checkpoint):
    from vllm_engine import Engine, SamplingParams

    path, weights = awq_checkpoint(128)
    hf = hf_reference(float_checkpoint, weights)
    engine = Engine(model=str(path), quantization="awq", dtype="float32", device="cpu", max_model_len=128)
    ids = [engine.tokenize(p) for p in ("Hello, my name is", "A paged KV cache stores")]
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for prompt_ids, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt_ids, 10)[0]


def test_each_rank_holds_its_slice(awq_checkpoint):
    path, weights = awq_checkpoint(32)
    cfg = model_config(path)
    for rank in range(2):
        with override_parallel_state(rank, 2, 0, 1):
            model = get_model(cfg, CPU, TorchAttentionBackend())
        for prefix, m in model.named_modules():
            if isinstance(m, LinearBase):
                assert torch.equal(dequantize(m.wna16, torch.float64).t(), _rank_slice(m, prefix, weights)), prefix


@pytest.mark.parametrize("field,value,match", [("bits", 8, "bits=8"), ("version", "gemv", "version='gemv'"),
                                               ("zero_point", False, "zero_point=false")])
def test_unsupported_settings_refused_at_start(field, value, match, awq_checkpoint, tmp_path):
    path, _ = awq_checkpoint(128)
    bad = tmp_path / "ckpt"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        model_config(bad)
