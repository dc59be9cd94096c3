"""Structured outputs in the offline engine on the real SmolLM2: outputs validated by independent
references (jsonschema, re), unconstrained neighbours untouched, n > 1, preemption, prefix caching,
max_tokens, a constraint that does not compile, both step paths (sync and async scheduling)."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future

import jsonschema
import pytest

from vllm_engine import SamplingParams, StructuredOutputsParams

from .conftest import chat_prompt
from .schemas import SCHEMAS

pytestmark = pytest.mark.slow

PERSON = SCHEMAS[0][1]
FLAG = SCHEMAS[2][1]


def _json(schema: dict, max_tokens: int = 40, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(json=schema),
                          **kw)


@pytest.fixture(scope="module")
def sync_engine(smollm2_gguf):
    from vllm_engine import Engine

    from .conftest import SMOL_KWARGS

    engine = Engine(model=str(smollm2_gguf), async_scheduling=False, **SMOL_KWARGS)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("engine_fixture", ["smol_engine", "sync_engine"])
def test_unconstrained_tokens_unchanged_beside_constrained_requests(engine_fixture, request):
    """Greedy unconstrained requests give the same tokens alone and sharing every step with
    constrained ones (async scheduling on and off); the constrained ones validate."""
    engine = request.getfixturevalue(engine_fixture)
    plain = [chat_prompt(engine, q) for q in ("Name three colors.", "What is 2 + 2?")]
    plain_params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = engine.generate(plain, plain_params, use_tqdm=False)
    constrained = [chat_prompt(engine, "Describe a person as JSON.")] * 2
    mixed = engine.generate(plain + constrained, [plain_params] * 2 + [_json(FLAG)] * 2, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [o.outputs[0].token_ids for o in alone]
    for o in mixed[2:]:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), FLAG)


def test_choice_regex_grammar_and_json_object(smol_engine):
    p = chat_prompt(smol_engine, "Is the sky blue? Answer briefly.")
    specs = [StructuredOutputsParams(choice=["yes", "no", "maybe"]),
             StructuredOutputsParams(regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
             StructuredOutputsParams(grammar='root ::= "The answer is " ("red" | "blue") "."'),
             StructuredOutputsParams(json_object=True)]
    outs = smol_engine.generate([p] * 4, [SamplingParams(temperature=0, max_tokens=24, structured_outputs=s)
                                          for s in specs], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert texts[0] in ("yes", "no", "maybe")
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", texts[1])
    assert re.fullmatch(r"The answer is (red|blue)\.", texts[2])
    if outs[3].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(texts[3]), dict)
    else:  # a free-form object may not close within max_tokens; it still starts as one
        assert texts[3].startswith("{")
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[:3])


def test_n_samples_each_follow_the_schema(smol_engine):
    schema = SCHEMAS[21][1]  # weather: string, enum, bounded integer
    out = smol_engine.generate(chat_prompt(smol_engine, "Weather request as JSON."),
                               SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=40,
                                              structured_outputs=StructuredOutputsParams(json=schema)),
                               use_tqdm=False)
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


def test_max_tokens_ends_an_unfinished_constraint_with_length(smol_engine):
    out = smol_engine.generate(chat_prompt(smol_engine, "A person as JSON."), _json(PERSON, max_tokens=3),
                               use_tqdm=False)
    c = out.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3 and c.text.startswith("{")


def test_a_constraint_that_does_not_compile_ends_only_its_request(smol_engine):
    p = chat_prompt(smol_engine, "Hi")
    outs = smol_engine.generate([p, p], [SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
        regex="[a-")), SamplingParams(temperature=0, max_tokens=4)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "structured_outputs.regex" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "length" and outs[1].error is None


def test_preemption_and_prefix_caching_keep_outputs_valid(smollm2_gguf):
    """A KV cache too small for the batch: requests are preempted and recomputed (their grammars keep
    their state); the same prompt twice hits the prefix cache; every output validates."""
    from vllm_engine import Engine

    engine = Engine(model=str(smollm2_gguf), max_model_len=512, num_gpu_blocks_override=12, block_size=16,
                    enable_prefix_caching=True, async_scheduling=True, seed=0)
    try:
        picks = [SCHEMAS[i] for i in (0, 1, 18, 21, 22, 0)]
        prompts = [chat_prompt(engine, f"Give a JSON object for: {name}.") for name, _, _ in picks]
        outs = engine.generate(prompts, [_json(s, max_tokens=40) for _, s, _ in picks], use_tqdm=False)
        stats = engine.get_stats()
    finally:
        engine.shutdown()
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0
    for (name, schema, _), o in zip(picks, outs):
        assert o.outputs[0].finish_reason == "stop", (name, o.outputs[0].text)
        jsonschema.validate(json.loads(o.outputs[0].text), schema)
    assert outs[0].outputs[0].text == outs[5].outputs[0].text  # same prompt and schema, greedy


def test_a_compiling_grammar_is_waited_for_without_spinning(smol_engine, monkeypatch):
    """A compile that takes 0.3 s: the engine loop waits on it instead of stepping idly hundreds of
    times, and the request then runs normally."""
    manager = smol_engine.structured_output_manager()
    real_submit = manager.submit

    def slow_submit(params):
        fut: Future = Future()
        threading.Timer(0.3, lambda: fut.set_result(real_submit(params).result())).start()
        return fut

    monkeypatch.setattr(manager, "submit", slow_submit)
    params = SamplingParams(temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(
        choice=["alpha", "beta"]))
    smol_engine.add_request("slow-grammar", chat_prompt(smol_engine, "Pick one."), params)
    steps, final = 0, None
    while smol_engine.has_unfinished_requests():
        for out in smol_engine.step():
            final = out
        steps += 1
    assert final.outputs[0].text in ("alpha", "beta") and final.outputs[0].finish_reason == "stop"
    assert steps < 80, steps  # 0.3 s in waits of up to 10 ms, plus the request's own steps


def test_a_token_the_grammar_refuses_ends_only_its_request(smol_engine, monkeypatch):
    """With the mask switched off in the sampler, the constrained request samples a token its grammar
    refuses: that request ends with an error naming it, its neighbour runs on."""
    import vllm_engine.layers.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "apply_token_bitmask", lambda logits, bitmask, rows: logits)
    p = chat_prompt(smol_engine, "Tell me a story.")
    outs = smol_engine.generate([p, p], [
        SamplingParams(temperature=0, max_tokens=6,
                       structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"])),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "refused token" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "length" and len(outs[1].outputs[0].token_ids) == 6


def test_constrained_requests_in_a_step_that_verifies_proposals(smollm2_gguf, smol_engine):
    """n-gram speculation proposes for a repetitive request; a constrained request shares its
    verifying steps (proposing too, since f6ed14a): it keeps its grammar there, and the speculated
    request's tokens are plain decoding's."""
    from vllm_engine import Engine

    from .conftest import SMOL_KWARGS

    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    repetitive = "One two three four five six seven eight nine ten. One two three four five six seven eight"
    plain = SamplingParams(temperature=0, max_tokens=16)
    constrained = SamplingParams(temperature=0, max_tokens=24,
                                 structured_outputs=StructuredOutputsParams(json=PERSON))
    prompt = chat_prompt(smol_engine, "Describe a person as JSON.")
    expected = smol_engine.generate(repetitive, plain, use_tqdm=False)
    engine = Engine(model=str(smollm2_gguf), speculative_config=ngram, **SMOL_KWARGS)
    try:
        outs = engine.generate([repetitive, prompt], [plain, constrained], use_tqdm=False)
        drafts = engine.scheduler.spec_stats.num_drafts
    finally:
        engine.shutdown()
    assert drafts > 0  # steps that verified proposals, with the constrained request in them
    assert outs[0].outputs[0].token_ids == expected.outputs[0].token_ids
    assert outs[1].outputs[0].finish_reason == "stop", outs[1].error
    jsonschema.validate(json.loads(outs[1].outputs[0].text), PERSON)
