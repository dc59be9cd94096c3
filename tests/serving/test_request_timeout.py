"""--request-timeout: a request past its deadline ends with a 408 (or an error event in a stream) and
its KV blocks are freed; requests that finish in time are untouched."""

from __future__ import annotations

import json
import logging
import time

import httpx
import openai
import pytest

from vllm_engine import Engine
from vllm_engine.engine.async_engine import AsyncEngine
from vllm_engine.serving.api_server import create_app

from .conftest import ENGINE_KWARGS, ThreadServer

TIMEOUT_S = 0.6
STEP_DELAY_S = 0.03  # every step is slowed down: 100 tokens take 3 s, far past the deadline


@pytest.fixture(scope="module")
def slow_server(tiny_dir):
    engine = Engine(model=str(tiny_dir), served_model_name="tiny", **ENGINE_KWARGS)
    step = engine.step

    def slow_step():
        time.sleep(STEP_DELAY_S)
        return step()

    engine.step = slow_step  # type: ignore[method-assign]
    with ThreadServer(create_app(AsyncEngine(engine, request_timeout=TIMEOUT_S))) as srv:
        yield srv


def _idle(srv: ThreadServer) -> bool:
    """Nothing running or waiting and every KV block free (read on the engine loop thread)."""
    import asyncio

    stats = asyncio.run(srv.app.state.async_engine.get_stats())
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks


def _wait_idle(srv: ThreadServer, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _idle(srv):
            return
        time.sleep(0.05)
    raise AssertionError("the engine still holds requests or blocks")


def test_a_request_past_its_deadline_is_a_408_and_frees_its_blocks(slow_server):
    t0 = time.time()
    r = httpx.post(f"{slow_server.url}/v1/completions", timeout=30,
                   json={"prompt": "Hello there", "max_tokens": 100, "ignore_eos": True})
    elapsed = time.time() - t0
    assert r.status_code == 408, r.text
    err = r.json()["error"]
    assert err["code"] == "request_timeout" and err["type"] == "timeout_error" and "0.6 s" in err["message"]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.5
    _wait_idle(slow_server)
    metrics = httpx.get(f"{slow_server.url}/metrics").text
    assert 'vllm_engine:request_success_total{finished_reason="abort",model_name="tiny"}' in metrics


def test_the_408_is_answered_without_the_server_dropping_the_connection(slow_server, caplog):
    """The timeout becomes its response in the app (serving/api_server.ErrorResponseMiddleware): an
    exception left to reach uvicorn makes it close the connection, which under load reached the
    client before the 408 did (it saw a connection reset)."""
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate to the root
    uvicorn_log.addHandler(caplog.handler)
    try:
        r = httpx.post(f"{slow_server.url}/v1/completions", timeout=30,
                       json={"prompt": "Hi", "max_tokens": 100, "ignore_eos": True})
        _wait_idle(slow_server)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert r.status_code == 408
    assert not [rec for rec in caplog.records if "Exception in ASGI application" in rec.getMessage()]


def test_a_stream_past_its_deadline_ends_with_an_error_event(slow_server):
    events = []
    with httpx.stream("POST", f"{slow_server.url}/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 100,
                            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "request_timeout"
    content = [json.loads(e) for e in events[:-2]]
    assert content and all("choices" in c for c in content)  # tokens were streamed before the deadline
    _wait_idle(slow_server)


def test_the_openai_client_sees_the_timeout_and_short_requests_finish(slow_server):
    client = openai.OpenAI(base_url=f"{slow_server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as exc:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=100, extra_body={"ignore_eos": True})
    assert exc.value.status_code == 408
    ok = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert ok.choices[0].finish_reason == "length" and ok.usage.completion_tokens == 3
    _wait_idle(slow_server)


def test_a_bad_timeout_is_refused():
    with pytest.raises(ValueError, match="request_timeout"):
        AsyncEngine(object(), request_timeout=0, start=False)


def test_the_deadline_counts_from_the_http_request(slow_server, monkeypatch):
    """Time spent before the engine (here a slow tokenizer) counts: the request is refused with a 408
    without ever being queued."""
    import asyncio

    ctx = slow_server.app.state.ctx
    tokenize = ctx.tokenize

    async def slow_tokenize(*args, **kwargs):
        await asyncio.sleep(TIMEOUT_S + 0.1)
        return await tokenize(*args, **kwargs)

    monkeypatch.setattr(ctx, "tokenize", slow_tokenize)
    prompt_tokens = asyncio.run(slow_server.app.state.async_engine.get_stats()).num_prompt_tokens_total
    r = httpx.post(f"{slow_server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    monkeypatch.setattr(ctx, "tokenize", tokenize)
    ok = httpx.post(f"{slow_server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200  # the slow one never reached the engine; this one did
    after = asyncio.run(slow_server.app.state.async_engine.get_stats()).num_prompt_tokens_total
    assert after - prompt_tokens == ok.json()["usage"]["prompt_tokens"]
