"""/v1/chat/completions and the small endpoints, with the OpenAI SDK; references: the offline
engine's chat(), the HF tokenizer's own chat template rendering, and HF transformers logprobs."""

from __future__ import annotations

import httpx
import pytest
import torch

from vllm_engine import SamplingParams

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


def _prompt_ids(hf_tokenizer, messages, **kw) -> list[int]:
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    return hf_tokenizer.encode(text, add_special_tokens=False)


def test_chat_greedy_matches_offline_chat_with_exact_usage(client, offline, hf_tokenizer):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    ref = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(_prompt_ids(hf_tokenizer, MESSAGES, add_generation_prompt=True))
    assert r.usage.completion_tokens == 10
    # text parts are joined into the same content
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]}]
    r2 = client.chat.completions.create(model="tiny", messages=parts, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert r2.choices[0].message.content == msg.content


def test_chat_streaming_sends_role_then_content_then_usage(client):
    kw = dict(model="tiny", messages=MESSAGES, max_completion_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_n_seed_and_logprobs(client, offline, tiny_dir):
    from transformers import AutoModelForCausalLM

    r = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, seed=3, temperature=1.0, top_p=1.0,
                                       max_tokens=6, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    ref = offline.chat(MESSAGES, SamplingParams(n=2, seed=3, temperature=1.0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    assert [c.message.content for c in r.choices] == [c.text for c in ref.outputs]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    prompt_ids = ref.prompt_token_ids
    for choice, comp in zip(r.choices, ref.outputs):
        content = choice.logprobs.content
        assert len(content) == 6 and all(len(e.top_logprobs) == 2 for e in content)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + comp.token_ids])).logits[0].double()
        lp = torch.log_softmax(logits, -1)[len(prompt_ids) - 1: -1]
        for pos, (entry, tid) in enumerate(zip(content, comp.token_ids)):
            assert entry.logprob == pytest.approx(lp[pos, tid].item(), abs=1e-3)
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(torch.topk(lp[pos], 2).values.tolist(),
                                                                              abs=1e-3)
            assert entry.bytes == list(entry.token.encode("utf-8"))


def test_default_max_tokens_from_generation_config_and_continue_final_message(client, hf_tokenizer, offline):
    # The tiny checkpoint's generation_config.json says max_new_tokens=64.
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 64
    convo = MESSAGES + [{"role": "assistant", "content": "Paris is"}]
    r = client.chat.completions.create(
        model="tiny", messages=convo, temperature=0, max_tokens=4,
        extra_body={"ignore_eos": True, "add_generation_prompt": False, "continue_final_message": True})
    ids = _prompt_ids(hf_tokenizer, convo, add_generation_prompt=False, continue_final_message=True)
    assert r.usage.prompt_tokens == len(ids)
    ref = offline.generate(ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert r.choices[0].message.content == ref.text


def test_models_version_health_tokenize_detokenize(server, client, hf_tokenizer):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].model_extra["max_model_len"] == 256
    assert httpx.get(f"{server}/health").status_code == 200
    from vllm_engine import __version__

    assert httpx.get(f"{server}/version").json() == {"version": __version__}
    text = "Hello, my name is Ada"
    tok = httpx.post(f"{server}/tokenize", json={"model": "tiny", "prompt": text}).json()
    assert tok["tokens"] == hf_tokenizer.encode(text) and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 256
    chat_tok = httpx.post(f"{server}/tokenize", json={"messages": MESSAGES}).json()
    assert chat_tok["tokens"] == _prompt_ids(hf_tokenizer, MESSAGES, add_generation_prompt=True)
    detok = httpx.post(f"{server}/detokenize", json={"tokens": tok["tokens"][1:]}).json()
    assert detok["prompt"] == text
