"""Engine-level behaviour with a tiny random Llama: seeds, n > 1, stops, limits, aborts and bad input."""

from __future__ import annotations

import pytest

from vllm_engine import Engine, SamplingParams

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def engine(tiny_model_dir, request):
    return Engine(model=str(tiny_model_dir("llama")), dtype="float32", max_model_len=128, seed=0,
                  enable_prefix_caching=False, async_scheduling=request.param)


def _drain(engine: Engine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    return done


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    alone = engine.generate(PROMPT, p, use_tqdm=False).token_ids
    crowd = engine.generate(["filler one", PROMPT, "another filler prompt"],
                            [SamplingParams(temperature=1.0, max_tokens=7), p, SamplingParams(temperature=0.7)],
                            use_tqdm=False)[1].token_ids
    assert alone == crowd
    other = engine.generate(PROMPT, SamplingParams(temperature=1.0, seed=99, max_tokens=10, ignore_eos=True),
                            use_tqdm=False).token_ids
    assert other != alone  # 10 tokens from a ~300-token vocabulary: a collision would be a seed bug


def test_n_samples_equal_seed_offsets_and_share_prompt_blocks(engine):
    n, seed = 3, 7
    ids = engine.tokenize(PROMPT * 3)
    before = engine.model_runner.num_tokens_processed
    out = engine.generate(ids, SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)
    processed = engine.model_runner.num_tokens_processed - before
    assert [c.index for c in out.outputs] == list(range(n))
    # Sample i draws with seed + i: the same tokens as a lone request with that seed.
    for i, c in enumerate(out.outputs):
        lone = engine.generate(ids, SamplingParams(temperature=1.0, seed=seed + i, max_tokens=6, ignore_eos=True),
                               use_tqdm=False)
        assert c.token_ids == lone.token_ids
    # The prompt is computed once; the other samples recompute only its last token.
    assert processed == len(ids) + (n - 1) + n * 5
    engine.scheduler.check_integrity()


def test_stop_strings_truncate_and_stream_without_leaking(engine):
    base = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    text = base.text
    assert len(text) > 12
    stop = text[8:11]
    first = text.index(stop)
    out = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop, "\x00zz"]),
                          use_tqdm=False)
    c = out.outputs[0]
    assert (c.text, c.finish_reason, c.stop_reason) == (text[:first], "stop", stop)
    out = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=stop,
                                                 include_stop_str_in_output=True), use_tqdm=False)
    assert out.text == text[: first + len(stop)]
    # Streaming: every partial text is a prefix of the final one and never shows the stop string.
    engine.add_request("stream", PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=stop))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.text for o in engine.step()]
    assert seen[-1] == text[:first]
    assert all(seen[-1].startswith(s) and stop not in s for s in seen)


def test_stop_token_ids_min_tokens_max_tokens_and_eos(engine):
    tok = engine.tokenize("fox", add_special_tokens=False)[0]
    force = {tok: 100.0}
    out = engine.generate(PROMPT, SamplingParams(temperature=0.0, logit_bias=force, stop_token_ids=[tok], max_tokens=9),
                          use_tqdm=False).outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([tok], "stop", tok)
    eos = sorted(engine.eos_token_ids)[0]
    out = engine.generate(PROMPT, SamplingParams(temperature=0.0, logit_bias={eos: 100.0}, min_tokens=3, max_tokens=9),
                          use_tqdm=False).outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos and eos not in out.token_ids[:3]
    assert out.finish_reason == "stop"
    out = engine.generate(PROMPT, SamplingParams(temperature=0.0, logit_bias={eos: 100.0}, ignore_eos=True,
                                                 max_tokens=5), use_tqdm=False).outputs[0]
    assert out.token_ids == [eos] * 5 and out.finish_reason == "length"
    # max_tokens=None: up to the context length.
    ids = engine.tokenize(PROMPT)
    out = engine.generate(ids, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None), use_tqdm=False)
    assert len(out.token_ids) == engine.max_model_len - len(ids)
    assert out.outputs[0].finish_reason == "length"


def test_abort_frees_blocks(engine):
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True, n=2))
    engine.step()
    engine.step()
    engine.abort_request("a")
    done = _drain(engine)
    assert set(done) == {"b"} and len(done["b"].outputs) == 2
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    engine.scheduler.check_integrity()


@pytest.mark.parametrize("prompt, params, match", [
    ("", SamplingParams(), "empty"),
    ([], SamplingParams(), "empty"),
    ("word " * 200, SamplingParams(), "128"),
    ([10**9], SamplingParams(), "token ids"),
    (PROMPT, SamplingParams(logit_bias={10**7: 1.0}), "logit_bias"),
    (PROMPT, SamplingParams(stop_token_ids=[10**7]), "stop_token_ids"),
    (PROMPT, "not params", "SamplingParams"),
])
def test_bad_requests_fail_clearly_and_others_keep_running(engine, prompt, params, match):
    engine.add_request("good", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, params)
    done = _drain(engine)
    assert set(done) == {"good"} and len(done["good"].token_ids) == 4
    engine.scheduler.check_integrity()


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-5), "top_k"),
    (dict(n=0), "n must"), (dict(max_tokens=0), "max_tokens"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(logprobs=21), "logprobs"), (dict(stop=[""]), "stop"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(min_p=1.5), "min_p"),
])
def test_invalid_sampling_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does-not-exist"):
        Engine(model=str(tmp_path / "does-not-exist"))
