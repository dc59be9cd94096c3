"""The engine with n-gram speculation gives the tokens it gives without (greedy), on tiny random
models and the real SmolLM2, through chunked prefill, preemption, prefix caching, n > 1, stop
strings, stop token ids, logprobs, async scheduling and max_tokens ending inside a proposal."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import CORPUS
from vllm_engine import Engine, SamplingParams

# adaptive off: every step proposes what it finds, so the tests' acceptance counts do not depend on timing.
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
         "adaptive": False}
# Repetitive prompts: the random models copy from them, and proposals get accepted.
PROMPTS = [CORPUS[i] + " " + CORPUS[i] for i in range(4)]
PARAMS = [SamplingParams(temperature=0.0, max_tokens=13 + 5 * i, logprobs=2 if i == 1 else None)
          for i in range(len(PROMPTS))] + [SamplingParams(temperature=0.0, max_tokens=20, n=2)]
# Greedy under penalties and min_tokens: each verified row must see the proposals before it as output.
PARAMS[2] = SamplingParams(temperature=0.0, max_tokens=23, repetition_penalty=1.3, frequency_penalty=0.4,
                           presence_penalty=0.2)
PARAMS[3] = SamplingParams(temperature=0.0, max_tokens=28, min_tokens=22, logit_bias={5: 2.0})


# On a GPU, a fixed block pool: these tests keep several engines alive at once (a profiled one takes
# most of the device, and the next finds no memory for its KV cache).
GPU_POOL = {"num_gpu_blocks_override": 1024} if torch.cuda.is_available() else {}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def baseline(tiny):
    return Engine(model=tiny, dtype="float32", max_model_len=256, seed=0, **GPU_POOL)


@pytest.fixture(scope="module")
def expected(baseline):
    return baseline.generate(PROMPTS + [PROMPTS[0]], PARAMS, use_tqdm=False)


def token_ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def check_engine_state(engine: Engine) -> None:
    engine.scheduler.check_integrity()
    assert not engine.has_unfinished_requests()
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == engine.num_gpu_blocks


# The engine settings under which a model proposer's greedy tokens must equal plain decoding's
# (test_eagle.py, test_eagle3.py): the default, chunked prefill, preemption, all with async scheduling.
HEAD_SETTINGS = pytest.mark.parametrize("kwargs", [
    {},
    {"max_num_batched_tokens": 16, "max_num_seqs": 4, "block_size": 4},
    {"num_gpu_blocks_override": 40, "block_size": 4, "enable_prefix_caching": False},
    {"async_scheduling": True, "num_gpu_blocks_override": 40, "block_size": 4, "max_num_batched_tokens": 16,
     "max_num_seqs": 4, "enable_prefix_caching": False},
], ids=["default", "chunked", "preempt", "async-chunked-preempt"])


def check_lossless(engine: Engine, baseline: Engine, kwargs: dict) -> None:
    """``engine`` (speculating, built with ``kwargs``) gives ``baseline``'s greedy tokens on PROMPTS
    and a repeated prompt, made proposals, was preempted where ``kwargs`` shrank its block pool, and
    left every block free and consistent."""
    got = engine.generate(PROMPTS + [PROMPTS[0]], PARAMS, use_tqdm=False)
    assert token_ids(got) == token_ids(baseline.generate(PROMPTS + [PROMPTS[0]], PARAMS, use_tqdm=False))
    assert engine.get_stats().spec_decode.num_draft_tokens > 0
    if "num_gpu_blocks_override" in kwargs:
        assert engine.get_stats().num_preemptions_total > 0
    check_engine_state(engine)


@pytest.mark.parametrize("kwargs", [
    {},  # prefix caching on, one step for everything
    {"max_num_batched_tokens": 16, "max_num_seqs": 4, "block_size": 4},  # chunked prefill, proposals cut short
    {"num_gpu_blocks_override": 48, "block_size": 4, "enable_prefix_caching": False},  # preemption
    # Async scheduling; above 3 running requests no proposals: overlapped steps between verifying ones.
    {"async_scheduling": True, "disable_by_batch_size": 3},
    # The adaptive policy on (whatever it decides from this machine's timings, the tokens are the same).
    {"async_scheduling": True, "adaptive": True},
    # Async scheduling with chunked prefill and preemption.
    {"async_scheduling": True, "num_gpu_blocks_override": 48, "block_size": 4, "max_num_batched_tokens": 16,
     "max_num_seqs": 4, "enable_prefix_caching": False},
], ids=["default", "chunked", "preempt", "async", "adaptive", "async-chunked-preempt"])
def test_greedy_tokens_equal_plain_decoding(tiny, expected, kwargs):
    kwargs = dict(kwargs)
    spec = {**NGRAM, **{f: kwargs.pop(f) for f in ("disable_by_batch_size", "adaptive") if f in kwargs}}
    engine = Engine(model=tiny, dtype="float32", max_model_len=256, seed=0, speculative_config=spec, **{**GPU_POOL, **kwargs})
    got = engine.generate(PROMPTS + [PROMPTS[0]], PARAMS, use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
    # Logprobs are the target's: the plain run's, token for token.
    for a, b in zip(got[1].outputs[0].logprobs, expected[1].outputs[0].logprobs):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) and a[t].rank == b[t].rank
    stats = engine.get_stats().spec_decode
    assert stats.num_accepted_tokens > (0 if "async_scheduling" in kwargs else 10)
    assert (engine.adaptive is not None) == spec["adaptive"]
    if "num_gpu_blocks_override" in kwargs:
        assert engine.get_stats().num_preemptions_total > 0
    check_engine_state(engine)


def test_prefix_cache_after_speculation_holds_only_verified_tokens(tiny, baseline):
    """Second round: each prompt is the first round's whole sequence, so it hits the blocks computed
    while speculating; a block cached with a rejected proposal's K/V in it would change the tokens."""
    engine = Engine(model=tiny, dtype="float32", max_model_len=256, seed=0, block_size=4, speculative_config=NGRAM, **GPU_POOL)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    first = engine.generate(PROMPTS, params, use_tqdm=False)
    assert engine.get_stats().spec_decode.num_draft_tokens > engine.get_stats().spec_decode.num_accepted_tokens
    second = [{"prompt_token_ids": o.prompt_token_ids + o.outputs[0].token_ids} for o in first]
    got = engine.generate(second, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert all(o.num_cached_tokens > 40 for o in got)
    expected = baseline.generate(second, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    check_engine_state(engine)


def test_stop_strings_end_inside_a_step(tiny, baseline):
    """A stop string completed by a token that a verifying step gave before its last one: the text,
    tokens and logprobs end there, as in the plain run (which gets that token alone)."""
    engine = Engine(model=tiny, dtype="float32", max_model_len=256, seed=0, speculative_config=NGRAM, **GPU_POOL)
    # Which tokens arrive inside a multi-token step, from the streamed outputs of an unstopped run.
    engine.add_request("probe", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=50))
    seen, inner = 0, []
    while engine.has_unfinished_requests():
        for o in engine.step():
            ids = o.outputs[0].token_ids
            inner += list(range(seen, len(ids) - 1))  # every new token but the step's last
            seen = len(ids)
            full = ids
    stops = []
    for j in inner:
        text = engine.detokenize(full[: j + 1])
        if text.strip() and text != engine.detokenize(full[:j]) and engine.detokenize(full).startswith(text):
            stops.append((j, text))  # the whole text so far: first complete at token j
    params = [SamplingParams(temperature=0.0, max_tokens=50, stop=[t], logprobs=1) for _, t in stops[:8]]
    expected = baseline.generate([PROMPTS[0]] * len(params), params, use_tqdm=False)
    got = engine.generate([PROMPTS[0]] * len(params), params, use_tqdm=False)
    # The plain run stops at that very token in (at least) most cases: the scenario is the intended one.
    assert sum(len(b.outputs[0].token_ids) == j + 1 for (j, _), b in zip(stops, expected)) >= 4
    for a, b in zip(got, expected):
        assert b.outputs[0].finish_reason == "stop"
        assert (a.outputs[0].text, a.outputs[0].token_ids, a.outputs[0].finish_reason) == \
            (b.outputs[0].text, b.outputs[0].token_ids, b.outputs[0].finish_reason)
        assert len(a.outputs[0].logprobs) == len(a.outputs[0].token_ids)
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-3)
    check_engine_state(engine)


def test_seeded_sampling_reproduces(tiny):
    engine = Engine(model=tiny, dtype="float32", max_model_len=256, seed=0, speculative_config=NGRAM, **GPU_POOL)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=30, seed=7, repetition_penalty=1.1)
    a = engine.generate(PROMPTS[:3], params, use_tqdm=False)
    b = engine.generate(PROMPTS[:3], params, use_tqdm=False)
    assert token_ids(a) == token_ids(b)
    check_engine_state(engine)


def test_smollm2_gguf_greedy_equal(smollm2_gguf):
    """The real model on an input-grounded prompt (repeat a passage): most proposals accepted."""
    passage = "The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in blocks."
    msgs = [{"role": "user", "content": f"Repeat this sentence exactly: {passage}"}]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    # float32 on a GPU too: bf16 rounding differs between the decode and the multi-token kernels.
    engine = Engine(model=str(smollm2_gguf), max_model_len=256, dtype="float32", speculative_config=NGRAM, **GPU_POOL)
    spec = engine.chat(msgs, params, use_tqdm=False)
    # The reference: the same engine with nothing proposing, which decodes plainly (one model load).
    engine.proposer = None
    plain = engine.chat(msgs, params, use_tqdm=False)
    assert engine.get_stats().spec_decode.num_drafts > 0
    assert spec.outputs[0].token_ids == plain.outputs[0].token_ids
    assert engine.get_stats().spec_decode.acceptance_rate > 0.5
    check_engine_state(engine)


def test_structured_output_requests_propose_and_keep_their_grammar(tiny, baseline):
    """Constrained requests propose too: each verified row is masked by the grammar after the
    proposals before it (WorkerGrammars.fill_verify), greedy tokens are plain decoding's, and
    sampled outputs always match the constraint."""
    import re

    from vllm_engine.sampling_params import StructuredOutputsParams

    engine = Engine(model=tiny, dtype="float32", max_model_len=256, seed=0, speculative_config=NGRAM, **GPU_POOL)
    greedy = SamplingParams(temperature=0.0, max_tokens=120,
                            structured_outputs=StructuredOutputsParams(regex=r"(The quick brown fox\. ){4}"))
    prompt = "The quick brown fox. The quick"
    got = engine.generate(prompt, greedy, use_tqdm=False)
    stats = engine.get_stats().spec_decode
    assert stats.num_accepted_tokens > 20
    expected = baseline.generate(prompt, greedy, use_tqdm=False)
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    assert got.outputs[0].text == "The quick brown fox. " * 4 and got.outputs[0].finish_reason == "stop"
    pattern = r"(one|two)( (one|two)){7}"
    sampled = SamplingParams(temperature=1.0, max_tokens=120, seed=3,
                             structured_outputs=StructuredOutputsParams(regex=pattern))
    outs = engine.generate(["one two one two one two"] * 4, sampled, use_tqdm=False)
    assert engine.get_stats().spec_decode.num_drafts > stats.num_drafts
    for o in outs:
        assert re.fullmatch(pattern, o.outputs[0].text), o.outputs[0].text
    check_engine_state(engine)


def test_verifying_steps_through_the_triton_kernels(tiny):
    """With the Triton attention backend (interpreted on the CPU), verifying steps take its split-KV
    multi-query decode path (k + 1 rows a sequence) and give plain decoding's greedy tokens."""
    from vllm_engine.attention import triton_kernels as K

    common = dict(model=tiny, dtype="float32", max_model_len=256, seed=0, attention_backend="triton", **GPU_POOL)
    params = [SamplingParams(temperature=0.0, max_tokens=12), SamplingParams(temperature=0.0, max_tokens=9)]
    plain = Engine(**common).generate(PROMPTS[:2], params, use_tqdm=False)
    engine = Engine(**common, speculative_config=NGRAM)
    assert engine.model_runner.attn_backend.multi_query_len == NGRAM["num_speculative_tokens"] + 1
    calls = []
    real = K.paged_attention_decode
    K.paged_attention_decode = lambda *a, **kw: (calls.append(kw.get("queries", 1)), real(*a, **kw))[1]
    try:
        got = engine.generate(PROMPTS[:2], params, use_tqdm=False)
    finally:
        K.paged_attention_decode = real
    assert token_ids(got) == token_ids(plain)
    assert engine.get_stats().spec_decode.num_accepted_tokens > 0
    assert NGRAM["num_speculative_tokens"] + 1 in calls  # verifying steps went through the multi-query kernel
    check_engine_state(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_verifying_steps_replay_cuda_graphs(tiny, expected):
    """On a GPU the verifying steps replay the verify graphs (k + 1 rows a sequence), and the greedy
    tokens are plain decoding's."""
    engine = Engine(model=tiny, dtype="float32", max_model_len=256, seed=0, speculative_config=NGRAM, **GPU_POOL)
    graphs = engine.model_runner.graph_runner
    assert graphs.verify_graphs and graphs.verify_query_len == NGRAM["num_speculative_tokens"] + 1
    replayed = []
    real = graphs.run
    graphs.run = lambda ids, pos, meta, stage=None: (replayed.append(meta.max_query_len), real(ids, pos, meta, stage))[1]
    got = engine.generate(PROMPTS + [PROMPTS[0]], PARAMS, use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    assert any(q > 1 for q in replayed)  # verifying steps, not only decodes
    check_engine_state(engine)
