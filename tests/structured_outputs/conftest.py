"""Fixtures of the structured-output tests: the real SmolLM2-135M-Instruct GGUF, offline and served."""

from __future__ import annotations

from typing import Iterator

import pytest

from serving.conftest import server_process

# A small fixed KV cache (the CPU default is GiBs) and a context long enough for the tool prompt.
SMOL_KWARGS = dict(max_model_len=1024, num_gpu_blocks_override=256, seed=0)
SMOL_FLAGS = ["--max-model-len", "1024", "--num-gpu-blocks-override", "256", "--seed", "0",
              "--served-model-name", "smol"]


@pytest.fixture(scope="session")
def smol_engine(smollm2_gguf):
    """The offline engine on SmolLM2 (async scheduling on, as on a GPU)."""
    pytest.importorskip("xgrammar")
    from vllm_engine import Engine

    engine = Engine(model=str(smollm2_gguf), async_scheduling=True, **SMOL_KWARGS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def smol_server(smollm2_gguf, tmp_path_factory) -> Iterator[str]:
    """Base URL of a real server process serving SmolLM2 as "smol"."""
    pytest.importorskip("xgrammar")
    log = tmp_path_factory.mktemp("smol-server") / "server.log"
    with server_process([str(smollm2_gguf), *SMOL_FLAGS], log) as (url, _):
        yield url


@pytest.fixture(scope="session")
def smol_client(smol_server):
    import openai

    return openai.OpenAI(base_url=f"{smol_server}/v1", api_key="unused", max_retries=0, timeout=300)


def chat_prompt(engine, question: str) -> dict:
    """A user question through the model's chat template, as an engine prompt."""
    text = engine.apply_chat_template([{"role": "user", "content": question}])
    return {"prompt": text, "prompt_token_ids": engine.tokenize(text, add_special_tokens=False)}
