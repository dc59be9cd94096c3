"""SqueezeLLM checkpoints (per-channel lookup tables, packed here from the format's description): logits
and greedy tokens against HF on the dequantized weights, each tensor-parallel rank's share, the
lookup-table kernels against float64, and refused settings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.e2e.test_engine_vs_hf import hf_greedy
from tests.quantization.conftest import hf_reference, write_squeezellm
from tests.quantization.test_gptq import CPU, LENS, SCHEDULE, _rank_slice, model_config
from tests.quantization.test_wna16_kernels import DEVICE
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.distributed import override_parallel_state
from vllm_engine.layers.linear import LinearBase
from vllm_engine.model_loader import get_model
from vllm_engine.quantization.kernels import wna16 as k
from vllm_engine.quantization.utils import pack_int32


@pytest.fixture(scope="module")
def squeezellm_checkpoint(float_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("squeezellm")
    return out, write_squeezellm(float_checkpoint, out)


def test_logits_and_greedy_tokens_match_hf(squeezellm_checkpoint, float_checkpoint, paged_vs_hf):
    from vllm_engine import Engine, SamplingParams

    path, weights = squeezellm_checkpoint
    cfg = model_config(path)
    assert cfg.quantization == "squeezellm"
    hf = hf_reference(float_checkpoint, weights)
    paged_vs_hf(get_model(cfg, CPU, TorchAttentionBackend()), cfg, hf, LENS, SCHEDULE, tol=2e-4)
    engine = Engine(model=str(path), quantization="squeezellm", dtype="float32", device="cpu", max_model_len=128)
    ids = [engine.tokenize(p) for p in ("Hello, my name is", "The capital of France is")]
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for prompt_ids, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt_ids, 10)[0]


def test_each_rank_holds_its_slice(squeezellm_checkpoint):
    path, weights = squeezellm_checkpoint
    cfg = model_config(path)
    for rank in range(2):
        with override_parallel_state(rank, 2, 0, 1):
            model = get_model(cfg, CPU, TorchAttentionBackend())
        for prefix, m in model.named_modules():
            if isinstance(m, LinearBase):
                got = k.dequantize(m.wna16, torch.float64).t()
                assert torch.equal(got, _rank_slice(m, prefix, weights)), prefix


@pytest.mark.parametrize("rows", [1, 5, 24])
def test_lookup_table_kernels_match_float64(rows):
    gen = torch.Generator().manual_seed(rows)
    q = torch.randint(0, 16, (128, 40), generator=gen)
    lut = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    ref = lut[torch.arange(40)[None, :], q]
    w = k.WNA16Weight(pack_int32(q, 4, 0).to(DEVICE), None, None, None, None, 4, 128, lut=lut.float().to(DEVICE))
    x = torch.randn(rows, 128, generator=gen, dtype=torch.float64)
    xd = x.float().to(DEVICE)
    got = [k.wna16_gemm(xd, w, config=(16, 32, 32, 4, 2)), k.wna16_gemm(xd, w, config=(16, 32, 32, 4, 2, "rows")),
           k.dequant_linear(xd, w, use_triton=False),
           k.dequant_linear(xd, w, use_triton=True)]
    if rows <= k.GEMV_MAX_ROWS:
        got.append(k.wna16_gemv(xd, w, config=(16, 64, 4, 2)))
    for y in got:
        torch.testing.assert_close(y.double().cpu(), x @ ref, rtol=1e-4, atol=1e-4)


def test_wbits_other_than_4_refused(squeezellm_checkpoint, tmp_path):
    path, _ = squeezellm_checkpoint
    bad = tmp_path / "ckpt"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["wbits"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="wbits=3"):
        model_config(bad)
