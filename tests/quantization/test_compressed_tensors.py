"""compressed-tensors pack-quantized W4A16 / W8A16 checkpoints written by the compressed-tensors library:
the engine's logits against HF transformers running the library's own dequantization of them, greedy
tokens, each tensor-parallel rank's share, and the schemes refused at start."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.e2e.test_engine_vs_hf import hf_greedy
from tests.quantization.conftest import hf_reference
from tests.quantization.test_gptq import CPU, LENS, SCHEDULE, _rank_slice, model_config
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.distributed import override_parallel_state
from vllm_engine.layers.linear import LinearBase
from vllm_engine.model_loader import get_model
from vllm_engine.quantization.kernels.wna16 import dequantize

pytest.importorskip("compressed_tensors")

# (bits, group_size (-1: per channel), symmetric)
CASES = [(4, 128, True), (4, 32, False), (8, -1, True), (8, 64, False), (4, -1, False)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "w%da16-g%d-%s" % (c[0], c[1], "sym" if c[2] else "asym"))
def test_logits_match_hf_on_library_dequantized_weights(case, ct_checkpoint, float_checkpoint, paged_vs_hf):
    path, weights = ct_checkpoint(*case)
    cfg = model_config(path)
    assert cfg.quantization == "compressed-tensors"
    model = get_model(cfg, CPU, TorchAttentionBackend())
    assert model.lm_head.quant_method is model.model.embed_tokens.quant_method  # "ignore": ["lm_head"]
    paged_vs_hf(model, cfg, hf_reference(float_checkpoint, weights), LENS, SCHEDULE, tol=2e-4)


def test_engine_greedy_tokens_equal_hf(ct_checkpoint, float_checkpoint):
    from vllm_engine import Engine, SamplingParams

    path, weights = ct_checkpoint(4, 32, False)
    hf = hf_reference(float_checkpoint, weights)
    engine = Engine(model=str(path), quantization="compressed-tensors", dtype="float32", device="cpu",
                    max_model_len=128)
    ids = [engine.tokenize(p) for p in ("Hello, my name is", "In the beginning", "The quick brown fox")]
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for prompt_ids, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt_ids, 10)[0]


@pytest.mark.parametrize("case", [(4, 32, False), (8, -1, True)])
def test_each_rank_holds_its_slice(case, ct_checkpoint):
    path, weights = ct_checkpoint(*case)
    cfg = model_config(path)
    for rank in range(2):
        with override_parallel_state(rank, 2, 0, 1):
            model = get_model(cfg, CPU, TorchAttentionBackend())
        for prefix, m in model.named_modules():
            if isinstance(m, LinearBase):
                assert torch.equal(dequantize(m.wna16, torch.float64).t(), _rank_slice(m, prefix, weights)), prefix


@pytest.mark.parametrize("edit,match", [
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"}),
     "config_groups.group_0.input_activations"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=2), "group_0.weights.num_bits=2"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor"), "weights.strategy='tensor'"),
    (lambda q: q.update(format="marlin-24") or q["config_groups"]["group_0"].pop("format"),
     "format 'marlin-24' is not supported"),
    (lambda q: q.update(format="float-quantized") or q["config_groups"]["group_0"].pop("format"),
     "weights: type='int' num_bits=4 is not supported with float-quantized"),
    (lambda q: q.update(ignore=["re:.*q_proj$"]), "self_attn.qkv_proj: the modules fused in it"),
])
def test_unsupported_schemes_refused_at_start(edit, match, ct_checkpoint, tmp_path):
    path, _ = ct_checkpoint(4, 32, False)
    bad = tmp_path / "ckpt"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    edit(cfg["quantization_config"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        get_model(model_config(bad), CPU, TorchAttentionBackend())


@pytest.mark.parametrize("per_channel,static", [(True, False), (False, True)])
def test_fp8_w8a8(per_channel, static, float_checkpoint, tmp_path):
    """float-quantized FP8 written by the library: per-channel weight scales with dynamic per-token
    activations, or per-tensor scales with static input scales (checked as tests/quantization/test_fp8.py
    checks FP8: every layer exactly, the model within FP8 noise of HF with e4m3 activation hooks)."""
    from tests.quantization.conftest import write_compressed_tensors_fp8
    from tests.quantization.test_fp8 import check_model

    weights, in_scales = write_compressed_tensors_fp8(float_checkpoint, tmp_path / "ct", per_channel, static)
    cfg = model_config(tmp_path / "ct")
    model = get_model(cfg, CPU, TorchAttentionBackend())
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    check_model(model, cfg, float_checkpoint, weights, in_scales)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, True)])
def test_actorder_group_checkpoints(bits, symmetric, float_checkpoint, tmp_path, paged_vs_hf):
    """``actorder: "group"`` (``weight_g_idx``): logits against HF on the dequantized weights, and at tp = 2
    each rank's weights its slice (act order split across ranks: whole scale columns, groups by g_idx)."""
    from tests.quantization.conftest import write_compressed_tensors_actorder

    weights = write_compressed_tensors_actorder(float_checkpoint, tmp_path / "ct", bits, 32, symmetric)
    cfg = model_config(tmp_path / "ct")
    model = get_model(cfg, CPU, TorchAttentionBackend())
    assert model.model.layers[0].mlp.down_proj.wna16.perm is not None  # sorted into runs at one rank
    paged_vs_hf(model, cfg, hf_reference(float_checkpoint, weights), LENS, SCHEDULE, tol=2e-4)
    for rank in range(2):
        with override_parallel_state(rank, 2, 0, 1):
            model = get_model(cfg, CPU, TorchAttentionBackend())
        for prefix, m in model.named_modules():
            if isinstance(m, LinearBase):
                got = dequantize(m.wna16, torch.float64)
                if m.wna16.perm is not None:
                    got = torch.empty_like(got).index_copy_(0, m.wna16.perm, got)
                assert torch.equal(got.t(), _rank_slice(m, prefix, weights)), prefix
