"""GPU fast path against the PyTorch reference, inside the whole engine (skipped without CUDA).

Same weights (dummy, seeded), same prompts: the Triton backend (eager, and with CUDA graphs) must give
the reference backend's logprobs for every prompt position and for the generated tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_engine import Engine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(backend: str, eager: bool, dtype: str, prompts, max_tokens: int = 8, **kw):
    engine = Engine(model="qwen3-0.6b", load_format="dummy", dtype=dtype, max_model_len=1024, seed=0,
                    attention_backend=backend, enforce_eager=eager, max_num_seqs=32, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=0, logprobs=0,
                            detokenize=False)
    outs = engine.generate(prompts, params, use_tqdm=False)
    engine.scheduler.check_integrity()
    del engine
    torch.cuda.empty_cache()
    return outs


def _prompt_lps(out) -> np.ndarray:
    return np.array([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])])


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-2), ("bfloat16", 0.15)])
def test_triton_backend_matches_reference(dtype, tol):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 150000, n).tolist() for n in (1, 7, 16, 33, 200, 513)]
    ref = _run("torch", True, dtype, prompts)
    for eager in (True, False):
        got = _run("triton", eager, dtype, prompts, max_num_batched_tokens=256)  # chunked prefill too
        for a, b in zip(ref, got):
            if len(a.prompt_token_ids) > 1:
                assert np.abs(_prompt_lps(a) - _prompt_lps(b)).max() < tol
            # Generated tokens: compare the logprob each engine gave to its own first token, and the tokens
            # while they agree (near-uniform dummy logits may flip an argmax within rounding).
            la = a.outputs[0].logprobs[0][a.token_ids[0]].logprob
            lb = b.outputs[0].logprobs[0][b.token_ids[0]].logprob
            assert abs(la - lb) < tol


def test_real_smollm2_gguf_on_the_gpu_matches_the_reference_backend(smollm2_gguf):
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) on the GPU fast path, bf16 with CUDA
    graphs, against the PyTorch reference backend in float32: the same greedy replies (while the two
    agree) and logprobs within bf16 tolerance, and a reply that reads as text."""
    questions = ["What is the capital of France?", "Name three colors.", "Write one sentence about the sea."]
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=0)
    replies = {}
    for backend, dtype, eager in (("torch", "float32", True), ("triton", "bfloat16", False)):
        engine = Engine(model=str(smollm2_gguf), dtype=dtype, attention_backend=backend, enforce_eager=eager,
                        max_model_len=512, seed=0)
        replies[backend] = engine.chat([[{"role": "user", "content": q}] for q in questions], params, use_tqdm=False)
        engine.scheduler.check_integrity()
        del engine
        torch.cuda.empty_cache()
    assert "Paris" in replies["triton"][0].text
    for ref, got in zip(replies["torch"], replies["triton"]):
        same = 0
        while same < min(len(ref.token_ids), len(got.token_ids)) and ref.token_ids[same] == got.token_ids[same]:
            same += 1
        assert same >= 4, (ref.text, got.text)
        for i in range(same):
            tok = ref.token_ids[i]
            assert abs(ref.outputs[0].logprobs[i][tok].logprob - got.outputs[0].logprobs[i][tok].logprob) < 0.15
