"""Every new family on the GPU fast path (Triton attention with soft caps and windows, the fused q/k/v
pass, the Triton experts, CUDA graphs) against HF transformers on the CPU, through the whole engine.
Skipped without CUDA. float32: the greedy tokens equal and prompt logprobs within 2e-3; bfloat16 (the
dense families; on the CPU their bf16 runs are within 0.035 of HF): prompt logprobs within 0.15, the
first generated token equal."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_engine_vs_hf import hf_greedy
from tests.models.family_helpers import PROMPTS, load_hf_reference, tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
FAMILIES = ["gemma", "gemma2", "gemma3", "phi3", "gpt2", "neox", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2",
            "deepseek_v3"]


def tiny_family_config(family: str, tiny):
    from tests.models import test_deepseek, test_gemma, test_gpt2_neox, test_moe, test_phi3

    if family.startswith("gemma"):
        return test_gemma.gemma_config(family, tiny), 0.0
    if family == "phi3":
        return test_phi3.phi3_config("longrope", tiny), 1.0
    if family in ("gpt2", "neox"):
        return test_gpt2_neox.family_config(family, tiny), 1.0
    if family.startswith("deepseek"):
        return test_deepseek.deepseek_config(family[-2:], tiny), 1.0
    return test_moe.moe_config(family, tiny), 1.0


@pytest.fixture(scope="module")
def family_dir(tiny_model_dir, tmp_path_factory):
    def make(family: str):
        tiny = tiny_model_dir("llama")
        config, center = tiny_family_config(family, tiny)
        return tiny_checkpoint(config, tmp_path_factory.mktemp(family), tiny, norm_center=center)

    return make


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,eager", [("float32", True), ("float32", False), ("bfloat16", False)])
def test_gpu_engine_matches_hf(family, dtype, eager, family_dir):
    from vllm_engine import Engine, SamplingParams

    if dtype == "bfloat16" and family in MOE:
        pytest.skip("bf16 rounding flips near-tie expert choices against HF's float32 (prompt logprobs off by "
                    "up to ~1 on the CPU too); float32 covers the MoE path")
    path = family_dir(family)
    hf = load_hf_reference(path)
    engine = Engine(model=str(path), dtype=dtype, device="cuda", max_model_len=128, seed=0, enforce_eager=eager,
                    block_size=16, max_num_batched_tokens=32, max_num_seqs=8)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    outs = engine.generate(PROMPTS, params, use_tqdm=False)
    engine.scheduler.check_integrity()
    for out in outs:
        ids = out.prompt_token_ids
        tokens, _, prompt_lps = hf_greedy(hf, ids, 8)
        got = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
        if dtype == "float32":
            assert out.token_ids == tokens
            assert got == pytest.approx(prompt_lps, abs=2e-3)
        else:
            assert out.token_ids[0] == tokens[0]
            assert got == pytest.approx(prompt_lps, abs=0.15)
    del engine
    torch.cuda.empty_cache()
