"""Structured outputs on a GPU (skipped without CUDA): the default engine there (async scheduling,
CUDA graphs) on SmolLM2, with constrained and unconstrained requests in one batch."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from vllm_engine import SamplingParams, StructuredOutputsParams

from .conftest import chat_prompt
from .schemas import SCHEMAS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_mixed_batch(smollm2_gguf):
    pytest.importorskip("xgrammar")
    from vllm_engine import Engine

    # float32: the unconstrained tokens are compared across batch compositions (bf16 can flip near-ties)
    engine = Engine(model=str(smollm2_gguf), max_model_len=1024, seed=0, max_num_seqs=64, dtype="float32")
    assert engine.config.device.async_scheduling
    try:
        plain = [chat_prompt(engine, q) for q in ("Name three colors.", "What is 2 + 2?", "Say hello.")]
        plain_params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        alone = engine.generate(plain, plain_params, use_tqdm=False)
        constrained = [chat_prompt(engine, f"Give me an example {name} as JSON.") for name, _, _ in SCHEMAS]
        params = [SamplingParams(temperature=0, max_tokens=64, structured_outputs=StructuredOutputsParams(json=s))
                  for _, s, _ in SCHEMAS]
        mixed = engine.generate(plain + constrained, [plain_params] * 3 + params, use_tqdm=False)
        sampled = engine.generate(constrained[:4], [SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=64,
                                                                   structured_outputs=p.structured_outputs)
                                                    for p in params[:4]], use_tqdm=False)
        engine.scheduler.check_integrity()
    finally:
        engine.shutdown()
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in alone]
    for (name, schema, _), o in zip(SCHEMAS, mixed[3:]):
        assert o.outputs[0].finish_reason == "stop", (name, o.outputs[0].text)
        jsonschema.validate(json.loads(o.outputs[0].text), schema)
    for (name, schema, _), o in zip(SCHEMAS, sampled):
        for c in o.outputs:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), schema)
            else:  # a sampled reply may wander within the schema past max_tokens
                assert c.finish_reason == "length", (name, c.text)
