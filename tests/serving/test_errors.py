"""Every error the API promises, in OpenAI's shape: 400 (bad parameters, over-long prompts, bad JSON,
wrong types), 401 (API key), 404 (unknown model), 503 + Retry-After (full queue), and a dead engine
(in-flight requests get an error event, /health 503, the server exits non-zero)."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import openai
import pytest

from vllm_engine import Engine
from vllm_engine.engine.async_engine import AsyncEngine
from vllm_engine.serving.api_server import create_app

from .conftest import ENGINE_KWARGS, ThreadServer, free_port, parse_metrics, wait_healthy
from .test_async_engine import ProxyEngine


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_bad_requests_are_400_with_openai_errors(server, client):
    url = f"{server}/v1/completions"
    over = httpx.post(url, json={"model": "tiny", "prompt": list(range(3, 303))})  # 300 token ids
    err = _error(over, 400)
    assert "256" in err["message"] and "300" in err["message"]
    err = _error(httpx.post(url, json={"model": "tiny", "prompt": "Hello", "max_tokens": 300}), 400)
    assert "256" in err["message"] and "300" in err["message"]
    assert "temperature" in _error(httpx.post(url, json={"prompt": "Hi", "temperature": -1}), 400)["message"]
    assert "top_p" in _error(httpx.post(url, json={"prompt": "Hi", "top_p": 1.5}), 400)["message"]
    assert "n " in _error(httpx.post(url, json={"prompt": "Hi", "n": 0}), 400)["message"] + " "
    assert _error(httpx.post(url, json={"prompt": "Hi", "temperature": "hot"}), 400)["param"] == "temperature"
    assert _error(httpx.post(url, json={"prompt": "Hi", "max_tokens": [1]}), 400)["param"] == "max_tokens"
    _error(httpx.post(url, json={"prompt": "Hi", "logprobs": 50}), 400)
    _error(httpx.post(url, json={"prompt": [999999]}), 400)  # token id outside the vocabulary
    _error(httpx.post(url, json={"prompt": ""}), 400)
    _error(httpx.post(url, json={"prompt": []}), 400)
    _error(httpx.post(url, json={}), 400)  # no prompt
    bad_json = httpx.post(url, content=b'{"prompt": "Hi", ', headers={"content-type": "application/json"})
    assert "JSON" in _error(bad_json, 400)["message"]
    _error(httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    chat = f"{server}/v1/chat/completions"
    _error(httpx.post(chat, json={"messages": []}), 400)
    _error(httpx.post(chat, json={"messages": "hello"}), 400)
    _error(httpx.post(chat, json={"messages": [{"role": "wizard", "content": "hi"}]}), 400)
    _error(httpx.post(chat, json={"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}), 400)
    _error(httpx.post(chat, json={"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}), 400)
    long = [{"role": "user", "content": "one two three " * 200}]
    assert "256" in _error(httpx.post(chat, json={"messages": long}), 400)["message"]

    def raw(path: str, body: bytes) -> httpx.Response:
        return httpx.post(f"{server}{path}", content=body, headers={"content-type": "application/json"})

    # a lone surrogate (valid JSON, not valid Unicode) used to crash the tokenizer: 500
    assert _error(raw("/tokenize", b'{"prompt": "\\ud800"}'), 400)["param"] == "prompt"
    assert _error(raw("/tokenize", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'), 400)["param"] == "messages"
    _error(raw("/v1/completions", b'{"prompt": "\\ud800"}'), 400)
    # a request's own chat template runs only on a server that trusts them (it could loop for minutes)
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    err = _error(httpx.post(chat, json={"messages": [{"role": "user", "content": "hi"}], "chat_template": looping},
                            timeout=10), 400)
    assert err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"]
    # the SDK sees them as BadRequestError
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="Hi", temperature=-2)


def test_unknown_model_and_route_are_404(server, client):
    err = _error(httpx.post(f"{server}/v1/completions", json={"model": "gpt-17", "prompt": "Hi"}), 404)
    assert "gpt-17" in err["message"] and err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    _error(httpx.get(f"{server}/v1/nothing-here"), 404)


@pytest.fixture
def tiny_engine(tiny_dir):
    """One engine per test: a ThreadServer's exit shuts its engine down (and releases it)."""
    return Engine(model=str(tiny_dir), served_model_name="tiny", **ENGINE_KWARGS)


def test_api_key_is_required_except_for_health_and_metrics(tiny_engine, monkeypatch):
    app = create_app(AsyncEngine(tiny_engine), api_key="s3cret")
    with ThreadServer(app) as srv:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
        assert _error(httpx.post(f"{srv.url}/v1/completions", json=body), 401)["code"] == "invalid_api_key"
        _error(httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        _error(httpx.get(f"{srv.url}/v1/models"), 401)
        ok = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        # the scheme is case-insensitive (RFC 7235), the key is not
        for header in ("bearer s3cret", "BEARER s3cret", "Bearer  s3cret"):
            assert httpx.get(f"{srv.url}/v1/models", headers={"Authorization": header}).status_code == 200, header
        for header in ("Bearer S3CRET", "Basic s3cret", "Bearers3cret", "s3cret", "Bearer s3cret2"):
            _error(httpx.get(f"{srv.url}/v1/models", headers={"Authorization": header}), 401)
        # the document says so: bearer auth on every operation but /health and /metrics
        doc = httpx.get(f"{srv.url}/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()
        assert doc["components"]["securitySchemes"]["APIKey"] == {
            "type": "http", "scheme": "bearer", "description": "The server's --api-key."}
        secured = {path for path, ops in doc["paths"].items() if all("security" in op for op in ops.values())}
        assert secured == set(doc["paths"]) - {"/health", "/metrics"}
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret").models.list().data[0].id == "tiny"
    # the CLI takes the key from the environment too
    import argparse

    from vllm_engine.serving.cli_serve import add_serve_args

    monkeypatch.setenv("VLLM_ENGINE_API_KEY", "from-env")
    assert add_serve_args(argparse.ArgumentParser()).parse_args([]).api_key == "from-env"


def test_full_waiting_queue_is_503_with_retry_after(tiny_dir):
    engine = Engine(model=str(tiny_dir), served_model_name="tiny", max_num_seqs=1, max_waiting_requests=1,
                    **ENGINE_KWARGS)
    slow = ProxyEngine(engine, step_delay=0.05)  # the first request keeps running for ~7 s
    with ThreadServer(create_app(AsyncEngine(slow))) as srv:
        long = {"model": "tiny", "prompt": "Hello", "max_tokens": 150, "ignore_eos": True, "temperature": 0}
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{srv.url}/v1/completions",
                                                          json={**long, "stream": True}) as running:
            lines = running.iter_lines()  # (keep it: dropping the iterator would close the connection)
            next(lines)  # the first request runs...
            waiting = threading.Thread(target=lambda: httpx.post(f"{srv.url}/v1/completions", json=long, timeout=60))
            waiting.start()  # ...the second waits (max_num_seqs=1)...
            deadline = time.time() + 20
            while parse_metrics(httpx.get(f"{srv.url}/metrics").text)["vllm_engine:num_requests_waiting"] < 1:
                assert time.time() < deadline
                time.sleep(0.02)
            r = httpx.post(f"{srv.url}/v1/completions", json=long)  # ...and the third is turned away
            err = _error(r, 503)
            assert r.headers["retry-after"] == "1" and "max_waiting_requests" in err["message"]
        slow.step_delay = 0.0
        waiting.join(60)


def test_a_dead_engine_fails_streams_reports_unhealthy_and_exits_nonzero(tiny_dir):
    from vllm_engine.serving.cli_serve import run_server

    proxy = ProxyEngine(Engine(model=str(tiny_dir), served_model_name="tiny", **ENGINE_KWARGS))
    app = create_app(AsyncEngine(proxy))
    port = free_port()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_server(app, "127.0.0.1", port, "warning")))
    thread.start()
    wait_healthy(f"http://127.0.0.1:{port}", timeout=30)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert "choices" in first
        proxy.explode = True
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert "boom" in error["message"] and error["type"] == "engine_dead"
    thread.join(30)
    assert not thread.is_alive() and result == [1]
    # /health of the dead app: 503
    import asyncio

    async def health() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            return (await c.get("/health")).status_code

    assert asyncio.run(health()) == 503


def test_a_trusted_request_chat_template_is_used(tiny_engine):
    app = create_app(AsyncEngine(tiny_engine), trust_request_chat_template=True)
    template = "{{ messages[0]['content'] }}"
    with ThreadServer(app) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hello"}], "chat_template": template, "max_tokens": 1})
        assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tiny_engine.tokenize("Hello", add_special_tokens=False))
    import argparse

    from vllm_engine.serving.cli_serve import add_serve_args

    parse = add_serve_args(argparse.ArgumentParser()).parse_args
    assert parse(["--trust-request-chat-template"]).trust_request_chat_template and \
        not parse([]).trust_request_chat_template


def test_a_non_streaming_client_that_hangs_up_is_aborted_without_an_error_log(tiny_dir, caplog):
    """The request is aborted (its blocks freed) and nothing is logged as an error: no "request
    failed", no InvalidStateError from reading the cancelled task too early."""
    engine = Engine(model=str(tiny_dir), served_model_name="tiny", **ENGINE_KWARGS)
    slow = ProxyEngine(engine, step_delay=0.02)  # 200 tokens: 4 s, the client leaves after 1 s
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True}
    with ThreadServer(create_app(AsyncEngine(slow))) as srv, caplog.at_level(logging.INFO):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", json=body, timeout=1.0)
        deadline = time.time() + 20
        while True:
            m = parse_metrics(httpx.get(f"{srv.url}/metrics").text)
            if m.get("vllm_engine:request_success_total{finished_reason=abort}") == 1 \
                    and m["vllm_engine:num_requests_running"] == 0:
                break
            assert time.time() < deadline, m
            time.sleep(0.05)
        assert m["vllm_engine:kv_cache_free_blocks"] == m["vllm_engine:kv_cache_total_blocks"]
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert any("aborted" in r.getMessage() for r in caplog.records)
