"""The real SmolLM2-135M-Instruct Q4_1 GGUF: our loader + model (through the paged KV cache) against HF
transformers loading the same GGUF file (its own dequantization and q/k un-permutation)."""

from __future__ import annotations

import pytest
import torch

from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.config import EngineArgs
from vllm_engine.model_loader import get_model
from vllm_engine.model_loader.tokenizer import get_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n   "]
DECODE_STEPS = 4


def test_smollm2_gguf_logits_and_greedy_match_hf(smollm2_gguf, run_paged):
    from transformers import AutoModelForCausalLM

    cfg = EngineArgs(model=str(smollm2_gguf), dtype="float32", device="cpu", max_model_len=512).create_engine_config().model
    assert cfg.load_format == "gguf" and cfg.architecture == "LlamaForCausalLM"
    tok = get_tokenizer(cfg)
    model = get_model(cfg, torch.device("cpu"), TorchAttentionBackend())
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    prompts = [tok.encode(p) for p in PROMPTS]
    # HF greedy continuation: the token sequences our decode steps will be fed.
    seqs = []
    with torch.no_grad():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=DECODE_STEPS, do_sample=False, pad_token_id=tok.eos_token_id)
            seqs.append(out[0].tolist())
    schedule = [[len(p) for p in prompts]] + [[1, 1]] * DECODE_STEPS
    ours = run_paged(model, cfg, seqs, schedule)
    for seq, prompt, got in zip(seqs, prompts, ours):
        got = torch.stack(got)
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0].float()
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
        # Our greedy choices after the prompt and after each decode step are HF's generated tokens.
        assert got[len(prompt) - 1:].argmax(-1).tolist()[:DECODE_STEPS] == seq[len(prompt):]
