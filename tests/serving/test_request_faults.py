"""Issue 16 over HTTP: the requests that used to kill the server are 400s naming the field as the
client spelled it, and a fault in one request's path fails only that request (500 or an in-band
error event) while the server keeps serving the others."""

from __future__ import annotations

import json

import httpx
import pytest

from vllm_engine import Engine
from vllm_engine.engine.async_engine import AsyncEngine
from vllm_engine.engine.detokenizer import IncrementalDetokenizer
from vllm_engine.serving.api_server import create_app

from .conftest import ENGINE_KWARGS, ThreadServer

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 2}


def _param_of_400(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] in err["message"]
    return err["param"]


@pytest.fixture(scope="module")
def limited_server(tiny_dir):
    engine = Engine(model=str(tiny_dir), served_model_name="tiny", max_waiting_requests=8,
                    **ENGINE_KWARGS)
    with ThreadServer(create_app(AsyncEngine(engine))) as srv:
        yield srv


@pytest.mark.parametrize("body,param", [
    ({"seed": 18446744073709551616}, "seed"),  # the request: 2^64
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 2**64 - 1, "n": 2}, "seed"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"n": 100000}, "n"),
    ({"n": 200}, "n"),  # past max_n = 128
    ({"n": 9}, "n"),  # can never fit under --max-waiting-requests 8
    ({"min_tokens": 300}, "min_tokens"),
    ({"logprobs": 21, "echo": True}, "logprobs"),
    ({"logit_bias": {"5": 1e300}}, "logit_bias"),
    ({"top_p": 1e-300}, "top_p"),
    ({"stop_token_ids": [99999999999999999999]}, "stop_token_ids"),
    ({"logit_bias": {"99999999999999999999999": 1}}, "logit_bias"),
    ({"temperature": 1e300}, "temperature"),
])
def test_completion_fields_out_of_range_are_400s(limited_server, body, param):
    r = httpx.post(f"{limited_server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **body})
    assert _param_of_400(r) == param
    assert httpx.get(f"{limited_server.url}/health").status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"max_completion_tokens": 5, "min_tokens": 9}, "min_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": None, "max_tokens": 0}, "max_tokens"),
    ({"seed": 2**64, "stream": True}, "seed"),
])
def test_chat_fields_are_named_as_the_client_spelled_them(limited_server, body, param):
    r = httpx.post(f"{limited_server.url}/v1/chat/completions", json={**CHAT, **body})
    assert _param_of_400(r) == param


def test_server_still_serves_after_the_bad_requests(limited_server):
    for body in ({"seed": 2**64}, {"seed": 2**64 - 1, "n": 2}, {"n": 200}):
        httpx.post(f"{limited_server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **body})
    ok = httpx.post(f"{limited_server.url}/v1/completions",
                    json={"prompt": "Hi", "max_tokens": 2, "seed": 2**64 - 1, "temperature": 1.0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_one_requests_fault_fails_only_that_request(tiny_dir, monkeypatch):
    """A detokenizer fault in one request: its non-streaming call is a 500, its stream ends with an
    error event and [DONE], the others complete, and the engine is idle and healthy afterwards."""
    engine = Engine(model=str(tiny_dir), served_model_name="tiny", **ENGINE_KWARGS)
    bad_tail = engine.tokenize("poison zq!?#&")[-5:]
    append = IncrementalDetokenizer.append

    def faulty(self, token_ids):
        if self._ids[: self._num_context] == bad_tail:
            raise RuntimeError("injected detokenizer fault")
        return append(self, token_ids)

    monkeypatch.setattr(IncrementalDetokenizer, "append", faulty)
    with ThreadServer(create_app(AsyncEngine(engine))) as srv:
        url = f"{srv.url}/v1/completions"
        body = {"max_tokens": 4, "temperature": 0.0}
        bad = httpx.post(url, json={**body, "prompt": "poison zq!?#&"}, timeout=30)
        assert bad.status_code == 500 and "injected detokenizer fault" in bad.json()["error"]["message"]
        with httpx.stream("POST", url, json={**body, "prompt": "poison zq!?#&", "stream": True}, timeout=30) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "injected detokenizer fault" in json.loads(events[-2])["error"]["message"]
        good = httpx.post(url, json={**body, "prompt": "a healthy prompt"}, timeout=30)
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"
        assert httpx.get(f"{srv.url}/health").status_code == 200
        stats = engine.get_stats()
        assert stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks
