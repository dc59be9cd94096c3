"""Structured outputs over several worker processes (tp=2, pp=2 on the CPU with gloo): each output
rank builds its own grammars from the model config, and the constrained and unconstrained tokens
are the one-rank engine's."""

from __future__ import annotations

import re

import pytest

from vllm_engine import Engine, SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.slow

KWARGS = dict(dtype="float32", max_model_len=128, num_gpu_blocks_override=64, seed=0, async_scheduling=True)
PROMPTS = ["Hello, my name is", "The capital of France is", "One two three"]
PATTERN = r"[a-e]{2,5}!"


def _params() -> list[SamplingParams]:
    constrained = SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(
        regex=PATTERN))
    return [constrained, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), constrained]


def _run(path, **kw) -> list[tuple[list[int], str, str]]:
    engine = Engine(model=str(path), **KWARGS, **kw)
    try:
        outs = engine.generate(PROMPTS, _params(), use_tqdm=False)
        engine.scheduler.check_integrity()
    finally:
        engine.shutdown()
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_constrained_tokens_match_one_rank(tiny_model_dir, tp, pp):
    pytest.importorskip("xgrammar")
    path = tiny_model_dir("llama")
    single = _run(path)
    for i in (0, 2):
        tokens, text, finish = single[i]
        assert finish == "stop" and re.fullmatch(PATTERN, text), text
    assert _run(path, tensor_parallel_size=tp, pipeline_parallel_size=pp) == single
