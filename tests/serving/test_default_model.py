"""`vllm-engine serve` with no model serves the built-in SmolLM2-135M-Instruct (GGUF) and answers a
chat through the OpenAI SDK, streaming (greedy HTTP == offline is checked on the tiny model; loading
SmolLM2 a second time here would double this test's time)."""

from __future__ import annotations

import openai
import pytest

from .conftest import server_process

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_serve_without_a_model_answers_a_streaming_chat(smollm2_gguf, tmp_path):
    flags = ["--max-model-len", "512", "--num-gpu-blocks-override", "64"]
    with server_process(flags, tmp_path / "serve.log") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        assert model == "SmolLM2-135M-Instruct"
        stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0,
                                                stream=True)
        reply = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        log = (tmp_path / "serve.log").read_text()
    assert "Paris" in reply
    # startup logs the KV cache size and the URL; each request gets one log line
    assert "64 blocks x 16 tokens = 1024 tokens" in log and f"{url}/v1" in log
    assert "finished: prompt" in log
