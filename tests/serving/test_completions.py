"""/v1/completions over HTTP with the official OpenAI SDK, against the offline engine (greedy, seeded
sampling), HF transformers (logprobs), the tokenizer (usage) and hand-computed expectations."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from vllm_engine import SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is", "In the beginning"]


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab] float64 log-softmax of the next-token logits at each position."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1]


def test_greedy_matches_the_offline_api_with_exact_usage(client, offline):
    for prompt in PROMPTS:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        ref = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        assert r.choices[0].text == ref.text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(offline.tokenize(prompt))
        assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
        assert r.model == "tiny" and r.object == "text_completion"


def test_streaming_equals_non_streaming_and_reports_usage(client):
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_n_samples_and_prompt_batches_match_the_offline_api(client, offline):
    params = dict(temperature=1.0, top_p=1.0, seed=5, max_tokens=8)
    r = client.completions.create(model="tiny", prompt=PROMPTS[:2], n=3, extra_body={"ignore_eos": True}, **params)
    assert [c.index for c in r.choices] == list(range(6))
    refs = offline.generate(PROMPTS[:2], SamplingParams(n=3, ignore_eos=True, **params), use_tqdm=False)
    for i, ref in enumerate(refs):
        for j, comp in enumerate(ref.outputs):
            assert r.choices[i * 3 + j].text == comp.text
    assert r.usage.completion_tokens == 6 * 8
    assert r.usage.prompt_tokens == sum(len(offline.tokenize(p)) for p in PROMPTS[:2])
    # the samples differ from each other (seed + index)
    assert len({c.text for c in r.choices[:3]}) > 1


def test_seed_reproducibility_and_token_id_prompts(client, offline):
    kw = dict(model="tiny", prompt=PROMPTS[2], max_tokens=10, temperature=1.0, top_p=1.0)
    a = client.completions.create(seed=11, **kw).choices[0].text
    b = client.completions.create(seed=11, **kw).choices[0].text
    c = client.completions.create(seed=12, **kw).choices[0].text
    assert a == b and a != c
    ids = offline.tokenize(PROMPTS[2])
    by_ids = client.completions.create(**{**kw, "prompt": ids}, seed=11)
    assert by_ids.choices[0].text == a and by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(**{**kw, "prompt": [ids, ids[:-1]]}, seed=11)
    assert batch.choices[0].text == a and len(batch.choices) == 2


def test_logprobs_match_hf_transformers(client, offline, hf_model):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    prompt_ids = offline.tokenize(PROMPTS[0])
    ref = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    hf = _hf_logprobs(hf_model, prompt_ids + ref.token_ids)[len(prompt_ids) - 1:]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for pos, tid in enumerate(ref.token_ids):
        assert lp.token_logprobs[pos] == pytest.approx(hf[pos, tid].item(), abs=1e-3)
        assert int(hf[pos].argmax()) == tid  # greedy picked the argmax
        top3 = torch.topk(hf[pos], 3).values.tolist()
        # keyed by token text, so two ids that decode alike (partial UTF-8 bytes) share an entry
        values = sorted(lp.top_logprobs[pos].values(), reverse=True)
        assert values[0] == pytest.approx(top3[0], abs=1e-3) and 1 <= len(values) <= 3
        assert all(any(abs(v - t) < 1e-3 for t in top3) for v in values)
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))


def test_echo_returns_the_prompt_and_its_logprobs(client, offline, hf_model):
    # A prompt no other test sends: prompt logprobs of prefix-cached tokens are not computed.
    prompt = "Echo test: the weather like today is sunny and warm."
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                  logprobs=1, extra_body={"ignore_eos": True})
    ref = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert r.choices[0].text == prompt + ref.text
    ids = offline.tokenize(prompt)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 3 and lp.token_logprobs[0] is None
    hf = _hf_logprobs(hf_model, ids + ref.token_ids)
    for pos in range(1, len(ids) + 3):
        assert lp.token_logprobs[pos] == pytest.approx(hf[pos - 1, (ids + ref.token_ids)[pos]].item(), abs=1e-3)


def test_stop_strings_stop_token_ids_and_logit_bias(client, offline):
    base = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)
    text = base.text
    stop = text[8:11]
    expected = text[: text.find(stop)]
    common = dict(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    r = client.completions.create(stop=[stop], extra_body={"ignore_eos": True}, **common)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    r = client.completions.create(stop=stop, extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
                                  **common)
    assert r.choices[0].text == expected + stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        stop=[stop], stream=True, extra_body={"ignore_eos": True}, **common))
    assert streamed == expected
    # stop_token_ids: generation ends on the 4th greedy token, which is counted as generated
    r = client.completions.create(extra_body={"ignore_eos": True, "stop_token_ids": [base.token_ids[3]]}, **common)
    first = base.token_ids.index(base.token_ids[3])
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == first + 1
    # a +100 logit bias forces one token everywhere
    forced = 42
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=5, temperature=0.8,
                                  logit_bias={str(forced): 100}, logprobs=0, extra_body={"ignore_eos": True})
    assert r.choices[0].logprobs.tokens == [offline.detokenize([forced])] * 5


def test_max_tokens_default_is_16(client):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
