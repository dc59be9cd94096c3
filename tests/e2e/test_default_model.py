"""The built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) against HF transformers
loading the same GGUF file, and the CLI on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_engine import Engine, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "def fibonacci(n):", "The three primary colors are"]


@pytest.fixture(scope="module")
def engine():
    return Engine(max_model_len=1024)  # no model: the built-in default


@pytest.fixture(scope="module")
def hf_model(engine):
    from transformers import AutoModelForCausalLM

    gguf = Path(engine.model_config.gguf_file)
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32).eval()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_default_model_matches_hf_on_the_same_gguf(engine, hf_model):
    assert engine.model_config.architecture == "LlamaForCausalLM"
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outs = engine.generate(PROMPTS, params, use_tqdm=False)
    for out in outs:
        ref = _hf_greedy(hf_model, out.prompt_token_ids, 24)
        n = len(out.token_ids)  # the engine may stop earlier at EOS
        assert out.token_ids == ref[:n]
        assert n == 24 or out.token_ids[-1] in engine.eos_token_ids


def test_chat_answers_sensibly(engine):
    out = engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, max_tokens=40))
    assert "Paris" in out.text


def test_cli_generate(engine, hf_model):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    res = subprocess.run([sys.executable, "-m", "vllm_engine.cli", "generate", "What is the capital of France?",
                          "--max-tokens", "16", "--temperature", "0", "--max-model-len", "512"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    text = engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = engine.tokenize(text, add_special_tokens=False)
    ref = engine.detokenize(_hf_greedy(hf_model, ids, 16), skip_special_tokens=True)
    assert res.stdout.strip() == ref.strip()
    assert "Paris" in res.stdout
