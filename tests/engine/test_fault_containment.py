"""One request must never take the engine down.

* Validation: every sampling field is checked in ``SamplingParams`` against the range the code after
  it can handle; the bounds are compared with what torch itself accepts (the generator's seed) and
  with the sampler's float32 arithmetic at the extremes.
* Admission: ``n`` is bounded by ``max_n`` and counted by ``max_waiting_requests`` as n sequences;
  ``min_tokens`` must fit in the context.
* Containment: a fault injected into one request's path (its generator's seeding in the model
  runner, its detokenization in the output processor, its registration) ends that request with an
  error; the other requests produce the same tokens as without it, and its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from vllm_engine import Engine, SamplingParams
from vllm_engine.engine.async_engine import AsyncEngine, QueueFullError, RequestFailedError
from vllm_engine.engine.detokenizer import IncrementalDetokenizer
from vllm_engine.engine.output_processor import OutputProcessor
from vllm_engine.layers.sampler import Sampler, SamplingMetadata
from vllm_engine.sampling_params import (
    MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY, MIN_TOP_P, SEED_MAX, SEED_MIN,
    SamplingParamsError)
from vllm_engine.worker.model_runner import ModelRunner

PROMPTS = ["The quick brown fox jumps over", "one two three four", "hello there, how are you"]
BAD = "a request whose path is broken"


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("seed", SEED_MAX + 1), ("seed", SEED_MIN - 1), ("seed", 1.5), ("seed", True),
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.1),
    ("temperature", MAX_TEMPERATURE * 10),
    ("top_p", 0.0), ("top_p", 1e-300), ("top_p", float("nan")), ("top_p", 1.01),
    ("min_p", float("nan")), ("min_p", -0.01), ("min_p", 1.5),
    ("presence_penalty", float("nan")), ("frequency_penalty", float("inf")), ("presence_penalty", 2.5),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
    ("repetition_penalty", float("nan")), ("repetition_penalty", 1e3),
    ("n", 0), ("n", 100_000), ("max_tokens", 0), ("min_tokens", -1), ("logprobs", 21), ("prompt_logprobs", -1),
    ("top_k", -2), ("logit_bias", {1: float("nan")}), ("logit_bias", {1: 1e30}), ("logit_bias", {-1: 1.0}),
])
def test_out_of_range_fields_name_themselves(field, value):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and str(e.value).startswith(field)
    assert isinstance(e.value, ValueError)


def test_seed_range_is_the_generators():
    """Our bounds are exactly what ``torch.Generator.manual_seed`` takes (the reference)."""
    for ok in (SEED_MIN, SEED_MAX, 0, -1):
        torch.Generator().manual_seed(ok)
        SamplingParams(seed=ok)
    for bad in (SEED_MIN - 1, SEED_MAX + 1):
        with pytest.raises((RuntimeError, ValueError)):
            torch.Generator().manual_seed(bad)
    # Sample i is seeded with seed + i: the last one must fit too.
    SamplingParams(seed=SEED_MAX - 1, n=2)
    with pytest.raises(SamplingParamsError, match="seed"):
        SamplingParams(seed=SEED_MAX, n=2)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=MAX_TEMPERATURE, top_p=MIN_TOP_P),
    SamplingParams(temperature=1e-5 * 1.01, repetition_penalty=MIN_REPETITION_PENALTY),
    SamplingParams(temperature=1.0, repetition_penalty=MAX_REPETITION_PENALTY, frequency_penalty=2.0,
                   presence_penalty=-2.0, min_p=1.0),
    SamplingParams(temperature=0.5, logit_bias={3: 100.0, 4: -100.0}, top_k=1),
], ids=["hot-narrow", "cold-rep-min", "rep-max-penalties", "bias-extremes"])
def test_extreme_accepted_values_keep_the_sampler_finite(params):
    """At the edges of every accepted range the sampler's float32 arithmetic still yields a real token
    whose logprob is finite (logits as large as 1e4 in magnitude)."""
    gen = torch.Generator().manual_seed(0)
    vocab = 64
    logits = torch.randn(2, vocab, generator=gen) * 1e4
    p = params.clone()
    p.logprobs = 1
    meta = SamplingMetadata.from_requests([p, p], [[1, 2, 3], [5]], [[7, 8], [9]], [{0}, {0}], {}, vocab,
                                          torch.device("cpu"))
    out = Sampler()(logits, meta)
    ids = out.sampled_token_ids.tolist()
    assert all(0 <= t < vocab for t in ids)
    assert all(math.isfinite(lp.sampled_logprob) for lp in out.logprobs)


# ---- admission ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def _engine(tiny_dir, **kw) -> Engine:
    args = dict(dtype="float32", max_model_len=128, seed=0, enable_prefix_caching=False)
    return Engine(model=str(tiny_dir), **{**args, **kw})


def test_seed_at_the_edges_runs_and_past_them_is_refused(tiny_dir):
    engine = _engine(tiny_dir)
    for seed, n in ((SEED_MAX, 1), (SEED_MIN, 2), (SEED_MAX - 2, 3)):
        out = engine.generate(PROMPTS[0], SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=3),
                              use_tqdm=False)
        assert len(out.outputs) == n and all(len(c.token_ids) >= 1 for c in out.outputs)
    for seed, n in ((SEED_MAX + 1, 1), (SEED_MAX, 2), (SEED_MIN - 1, 1)):
        with pytest.raises(ValueError, match="seed"):
            engine.generate(PROMPTS[0], SamplingParams(n=n, temperature=1.0, seed=seed), use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_n_is_bounded_and_counted_as_sequences_by_the_waiting_limit(tiny_dir):
    engine = _engine(tiny_dir, max_waiting_requests=8, max_n=6)
    with pytest.raises(SamplingParamsError, match="max_n") as e:
        engine.add_request("too-many", PROMPTS[0], SamplingParams(n=7))
    assert e.value.param == "n"
    engine.add_request("five", PROMPTS[0], SamplingParams(n=5, max_tokens=2))
    assert engine.num_waiting == 5
    with pytest.raises(QueueFullError):
        engine.add_request("four-more", PROMPTS[0], SamplingParams(n=4, max_tokens=2))
    engine.add_request("three-more", PROMPTS[1], SamplingParams(n=3, max_tokens=2))
    assert engine.num_waiting == 8
    engine_small = _engine(tiny_dir, max_waiting_requests=2)
    with pytest.raises(SamplingParamsError, match="max_waiting_requests"):
        engine_small.add_request("never-fits", PROMPTS[0], SamplingParams(n=3))
    while engine.has_unfinished_requests():
        engine.step()
    engine.scheduler.check_integrity()


def test_min_tokens_must_fit_in_the_context(tiny_dir):
    engine = _engine(tiny_dir)
    ids = engine.tokenize(PROMPTS[0])
    room = 128 - len(ids)
    with pytest.raises(SamplingParamsError, match="min_tokens") as e:
        engine.add_request("r", ids, SamplingParams(min_tokens=room + 1, max_tokens=None))
    assert e.value.param == "min_tokens"
    out = engine.generate(ids, SamplingParams(min_tokens=room, max_tokens=None, temperature=0.0), use_tqdm=False)
    assert len(out.token_ids) == room


# ---- containment --------------------------------------------------------------------------------
@pytest.fixture(params=[False, True], ids=["sync", "async-scheduling"])
def engine(tiny_dir, request):
    return _engine(tiny_dir, async_scheduling=request.param)


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _run(engine: Engine, requests: dict[str, SamplingParams], prompts: dict[str, str]) -> dict:
    for rid, params in requests.items():
        engine.add_request(rid, prompts[rid], params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
                assert out.request_id not in engine.scheduler.requests  # its blocks are back at once
    return done


def _assert_all_blocks_free(engine: Engine) -> None:
    engine.scheduler.check_integrity()
    assert engine.scheduler.kv_cache_manager.num_free_blocks == engine.num_gpu_blocks


def _inject_detokenizer_fault(monkeypatch, engine: Engine, bad_prompt: str) -> None:
    """Detokenizing the bad request's third token raises (its detokenizer sees the prompt's tail)."""
    tail = engine.tokenize(bad_prompt)[-5:]
    append = IncrementalDetokenizer.append

    def faulty(self, token_ids):
        if self._ids[: self._num_context] == tail and len(self.output_token_ids) >= 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected fault")
        return append(self, token_ids)

    monkeypatch.setattr(IncrementalDetokenizer, "append", faulty)


def test_detokenizer_fault_ends_only_its_request(engine, monkeypatch):
    prompts = {f"ok{i}": p for i, p in enumerate(PROMPTS)} | {"bad": BAD}
    good = {f"ok{i}": GREEDY for i in range(len(PROMPTS))}
    reference = _run(engine, good, prompts)
    _inject_detokenizer_fault(monkeypatch, engine, BAD)
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, n=2)
    done = _run(engine, {"ok0": GREEDY, "bad": seeded, "ok1": GREEDY, "ok2": GREEDY}, prompts)
    bad = done["bad"]
    assert bad.error is not None and "injected fault" in bad.error
    assert [c.finish_reason for c in bad.outputs] == ["error", "error"]
    for rid in good:
        assert done[rid].error is None and done[rid].outputs[0].token_ids == reference[rid].outputs[0].token_ids
    _assert_all_blocks_free(engine)
    monkeypatch.undo()  # the engine keeps serving
    again = engine.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    assert again.token_ids == reference["ok0"].token_ids


def test_runner_fault_in_one_requests_seeding_ends_only_it(engine, monkeypatch):
    prompts = {"ok0": PROMPTS[0], "ok1": PROMPTS[1], "bad": BAD}
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    reference = _run(engine, {"ok0": seeded, "ok1": GREEDY}, prompts)
    generator = ModelRunner._generator

    def faulty(self, req):
        if req.sampling_params.seed == 666:
            raise RuntimeError("injected seeding fault")
        return generator(self, req)

    monkeypatch.setattr(ModelRunner, "_generator", faulty)
    bad_params = SamplingParams(temperature=1.0, seed=666, max_tokens=12, ignore_eos=True)
    done = _run(engine, {"ok0": seeded, "bad": bad_params, "ok1": GREEDY}, prompts)
    assert "injected seeding fault" in done["bad"].error
    assert done["bad"].outputs[0].finish_reason == "error"
    for rid in ("ok0", "ok1"):
        assert done[rid].outputs[0].token_ids == reference[rid].outputs[0].token_ids
    _assert_all_blocks_free(engine)


def test_fault_while_adding_leaves_nothing_behind(engine, monkeypatch):
    add = OutputProcessor.add_request

    def faulty(self, request_id, *args, **kwargs):
        if request_id == "bad":
            raise KeyError("injected registration fault")
        return add(self, request_id, *args, **kwargs)

    monkeypatch.setattr(OutputProcessor, "add_request", faulty)
    with pytest.raises(KeyError):
        engine.add_request("bad", BAD, SamplingParams(n=3))
    assert engine.num_waiting == 0 and not engine.has_unfinished_requests()
    assert engine.generate(PROMPTS[0], GREEDY, use_tqdm=False).finished
    _assert_all_blocks_free(engine)


def test_async_engine_fails_the_one_stream_and_keeps_running(tiny_dir, monkeypatch):
    engine = _engine(tiny_dir)
    _inject_detokenizer_fault(monkeypatch, engine, BAD)
    add = OutputProcessor.add_request

    def faulty_add(self, request_id, *args, **kwargs):
        if request_id == "unaddable":
            raise KeyError("injected registration fault")
        return add(self, request_id, *args, **kwargs)

    monkeypatch.setattr(OutputProcessor, "add_request", faulty_add)
    async_engine = AsyncEngine(engine)

    async def main():
        async def one(rid, prompt):
            return await async_engine.generate_async(prompt, GREEDY, request_id=rid)

        results = await asyncio.gather(one("ok0", PROMPTS[0]), one("bad", BAD), one("ok1", PROMPTS[1]),
                                       one("unaddable", PROMPTS[2]), return_exceptions=True)
        return results

    try:
        ok0, bad, ok1, unaddable = asyncio.run(main())
        assert isinstance(bad, RequestFailedError) and "injected fault" in str(bad)
        assert isinstance(unaddable, RequestFailedError) and "registration" in str(unaddable)
        assert len(ok0.token_ids) == 12 and len(ok1.token_ids) == 12
        assert async_engine.is_healthy
        later = asyncio.run(async_engine.generate_async(PROMPTS[0], GREEDY))
        assert later.token_ids == ok0.token_ids
        stats = asyncio.run(async_engine.get_stats())
        assert stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks
    finally:
        async_engine.shutdown()
