"""The router (vllm_engine/serving/router.py) in front of real servers: model routing, spreading,
prefix affinity, the OpenAI SDK through it, /v1/models and /metrics; and its failure handling
against fake replicas that break before and after their first event."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from vllm_engine import Engine
from vllm_engine.engine.async_engine import AsyncEngine
from vllm_engine.serving.api_server import create_app
from vllm_engine.serving.router import PREFIX_CHUNK_CHARS, REPLICA_HEADER, create_router_app, prefix_hashes

from .conftest import ENGINE_KWARGS, ThreadServer, free_port, parse_metrics, wait_healthy

LONG_PREFIX = "You are a careful assistant. Here is the document to discuss: " + " ".join(
    f"paragraph {i} says the sky is blue and the grass is green." for i in range(3))


class AppThread:
    """Any ASGI app under uvicorn on a free port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "AppThread":
        self.thread.start()
        wait_healthy(self.url, timeout=30)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _replica(tiny_dir, name: str) -> ThreadServer:
    engine = Engine(model=str(tiny_dir), served_model_name=name, **ENGINE_KWARGS)
    return ThreadServer(create_app(AsyncEngine(engine)))


@pytest.fixture(scope="module")
def replicas(tiny_dir) -> Iterator[list[ThreadServer]]:
    """Two replicas serving `tiny` and one serving `tiny-b`."""
    with _replica(tiny_dir, "tiny") as a, _replica(tiny_dir, "tiny") as b, _replica(tiny_dir, "tiny-b") as c:
        yield [a, b, c]


@pytest.fixture(scope="module")
def router(replicas) -> Iterator[AppThread]:
    with AppThread(create_router_app([r.url for r in replicas], health_interval=0.5)) as srv:
        yield srv


def _complete(url: str, prompt: str, model: str = "tiny", **extra: Any) -> httpx.Response:
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r


def test_the_openai_sdk_works_through_the_router(router, replicas):
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert sorted(m.id for m in client.models.list()) == ["tiny", "tiny-b"]
    via_router = client.completions.create(model="tiny", prompt="The capital of France", max_tokens=6, temperature=0)
    direct = openai.OpenAI(base_url=f"{replicas[0].url}/v1", api_key="unused", max_retries=0).completions.create(
        model="tiny", prompt="The capital of France", max_tokens=6, temperature=0)
    assert via_router.choices[0].text == direct.choices[0].text and via_router.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "Hi"}],
                                                 max_completion_tokens=5, stream=True, temperature=0,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[0].model == "tiny-b"
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    assert exc.value.body["code"] == "model_not_found" and "tiny-b" in exc.value.body["message"]


def test_requests_route_by_model(router, replicas):
    for prompt in ("a", "b", "c"):
        assert _complete(router.url, prompt, model="tiny-b").headers[REPLICA_HEADER] == replicas[2].url
    used = {_complete(router.url, p).headers[REPLICA_HEADER] for p in ("d", "e", "f", "g")}
    assert replicas[2].url not in used


def test_distinct_requests_spread_over_the_replicas(router, replicas):
    prompts = [f"Question number {i}: why?" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        used = list(pool.map(lambda p: _complete(router.url, p, max_tokens=16).headers[REPLICA_HEADER], prompts))
    counts = {u: used.count(u) for u in set(used)}
    assert set(counts) == {replicas[0].url, replicas[1].url} and min(counts.values()) >= 2, counts


def test_shared_prefix_requests_land_on_the_replica_that_cached_it(router, replicas):
    first = _complete(router.url, LONG_PREFIX + " Question: what colour is the sky?")
    home = first.headers[REPLICA_HEADER]
    for q in ("the grass?", "paragraph 3?", "the sea?"):
        r = _complete(router.url, LONG_PREFIX + " Question: what colour is " + q)
        assert r.headers[REPLICA_HEADER] == home
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the replica's prefix cache hit
    metrics = parse_metrics(httpx.get(f"{router.url}/metrics").text)
    label = home.split("://")[1]
    assert metrics[f"vllm_engine_router:routed_requests_total{{reason=prefix,replica={label}}}"] >= 3


def test_affinity_yields_to_a_much_less_loaded_replica():
    from vllm_engine.serving.router import Router

    router = Router(["http://a", "http://b"], balance_slack_tokens=100)
    a, b = router.replicas
    a.healthy = b.healthy = True
    a.models = b.models = [{"id": "m"}]
    hashes = prefix_hashes("m", LONG_PREFIX)
    assert len(hashes) == len(LONG_PREFIX) // PREFIX_CHUNK_CHARS
    router.remember(hashes, b)
    assert router.pick("m", hashes, set()) == (b, "prefix")
    b.outstanding_tokens = 101
    assert router.pick("m", hashes, set()) == (a, "load")
    assert router.pick("m", hashes[:2], {"http://a"}) == (b, "prefix")  # a shorter shared prefix still matches
    assert router.pick("m", prefix_hashes("other-model", LONG_PREFIX), set())[1] == "load"


def test_models_and_metrics_cover_every_replica(router, replicas):
    models = httpx.get(f"{router.url}/v1/models").json()
    assert sorted(m["id"] for m in models["data"]) == ["tiny", "tiny-b"]
    text = httpx.get(f"{router.url}/metrics").text
    for r in replicas:
        label = r.url.split("://")[1]
        assert f'vllm_engine:num_requests_running{{model_name="{r.app.state.ctx.model_name}",replica="{label}"}}' in text
        assert f'vllm_engine_router:replica_healthy{{replica="{label}"}} 1.0' in text
    from prometheus_client.parser import text_string_to_metric_families

    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))  # each family once, its samples from every replica together


def test_tokenize_goes_to_a_replica_of_the_model(router, replicas):
    r = httpx.post(f"{router.url}/tokenize", json={"model": "tiny-b", "prompt": "Hello"})
    assert r.status_code == 200 and r.headers[REPLICA_HEADER] == replicas[2].url and r.json()["count"] > 0
    d = httpx.post(f"{router.url}/detokenize", json={"model": "tiny", "tokens": r.json()["tokens"]})
    assert d.status_code == 200 and d.json()["prompt"].endswith("Hello")
    status = httpx.get(f"{router.url}/router/replicas").json()["replicas"]
    assert all(s["outstanding_tokens"] == 0 and s["in_flight"] == 0 for s in status)


def test_a_client_leaving_a_stream_aborts_it_on_the_replica(router, replicas):
    import time

    def aborted() -> float:
        text = httpx.get(f"{replicas[2].url}/metrics").text
        return parse_metrics(text, "tiny-b").get("vllm_engine:request_success_total{finished_reason=abort}", 0.0)

    before = aborted()
    body = {"model": "tiny-b", "prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{router.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one event, then hang up
    engine = replicas[2].app.state.async_engine
    deadline = time.time() + 10
    while True:
        stats = asyncio.run(engine.get_stats())
        status = httpx.get(f"{router.url}/router/replicas").json()["replicas"][2]
        if stats.num_running == stats.num_waiting == 0 and status["in_flight"] == 0:
            break
        assert time.time() < deadline, (stats, status)
        time.sleep(0.05)
    assert stats.num_free_blocks == stats.num_total_blocks and status["outstanding_tokens"] == 0
    assert aborted() == before + 1  # ended by the hang-up, not by finishing


def test_bad_requests_are_400s_in_openais_shape(router):
    r = httpx.post(f"{router.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{router.url}/v1/completions", json=[1, 2])
    assert r.status_code == 400
    r = httpx.post(f"{router.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # the replica's own answer


# ---- failures, against fake replicas ----------------------------------------------------------------
def fake_replica(mode: str) -> FastAPI:
    """A replica serving model `tiny` that breaks: `before` drops the stream before its first event,
    `role` after a chat's role chunk (no token yet), `after` after one event with text; `dead` answers 503 engine_dead; `full` a full queue's 503 + Retry-After."""
    app = FastAPI()
    app.state.posts = 0

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "tiny", "object": "model"}]}

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def generate(request: Request) -> Any:
        app.state.posts += 1

        async def events() -> Any:
            if mode == "role":  # a chat's opening chunk, then the crash: no token reached anyone
                yield 'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
                await asyncio.sleep(0.05)
            if mode == "after":
                yield 'data: {"choices": [{"index": 0, "text": "partial"}]}\n\n'
                await asyncio.sleep(0.05)
            raise RuntimeError("replica crashed")
        return StreamingResponse(events(), media_type="text/event-stream")

    if mode in ("dead", "full"):
        from fastapi.responses import JSONResponse

        @app.middleware("http")
        async def refuse(request: Request, call_next: Any) -> Any:
            if request.method == "POST":
                app.state.posts += 1
                kind = "engine_dead" if mode == "dead" else "service_unavailable"
                return JSONResponse({"error": {"message": f"{mode}", "type": kind, "param": None, "code": 503}},
                                    status_code=503, headers={"Retry-After": "1"})
            return await call_next(request)

    return app


@pytest.mark.parametrize("mode", ["before", "role", "dead", "full"])
def test_a_replica_failing_before_the_first_token_is_retried_elsewhere(replicas, mode):
    with AppThread(fake_replica(mode)) as fake, \
            AppThread(create_router_app([fake.url, replicas[0].url], health_interval=60)) as router:
        for stream in (True, False):
            body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 3,
                    "stream": stream}
            r = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.headers[REPLICA_HEADER] == replicas[0].url
            if stream:
                events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
                roles = [e for e in events[:-1] if json.loads(e)["choices"][0]["delta"].get("role")]
                assert len(roles) == 1 and json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
            status = httpx.get(f"{router.url}/router/replicas").json()["replicas"]
            assert status[0]["healthy"] is (mode == "full") and status[0]["failed_attempts"] >= 1  # full: still up
            assert all(s["in_flight"] == 0 and s["outstanding_tokens"] == 0 for s in status)
            router.app.state.router.replicas[0].healthy = True  # as the next health check would
        assert fake.app.state.posts == 2


def test_a_replica_failing_mid_stream_ends_it_with_an_error_event(replicas):
    with AppThread(fake_replica("after")) as fake, \
            AppThread(create_router_app([fake.url, replicas[0].url], health_interval=60)) as router:
        r = httpx.post(f"{router.url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True})
        assert r.status_code == 200
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[0])["choices"][0]["text"] == "partial"
        assert json.loads(events[1])["error"]["code"] == "replica_failed" and events[2] == "[DONE]"
        assert len(events) == 3
        status = httpx.get(f"{router.url}/router/replicas").json()["replicas"]
        assert status[0]["stream_failures"] == 1 and status[0]["in_flight"] == 0


def test_when_every_replica_is_full_the_client_gets_their_503():
    with AppThread(fake_replica("full")) as a, AppThread(fake_replica("full")) as b, \
            AppThread(create_router_app([a.url, b.url], health_interval=60)) as router:
        r = httpx.post(f"{router.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "service_unavailable"
        assert a.app.state.posts == b.app.state.posts == 1  # tried on both


def test_no_healthy_replica_is_a_503(replicas):
    with AppThread(create_router_app([replicas[0].url], health_interval=60)) as router:
        router.app.state.router.replicas[0].healthy = False
        r = httpx.post(f"{router.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert httpx.get(f"{router.url}/health").status_code == 503


def test_the_replicas_dashboards_are_relayed(router, replicas):
    page = httpx.get(f"{router.url}/dashboard")
    assert page.status_code == 200 and page.text.count('href="dashboard/replica/') == 3
    assert replicas[2].url in page.text and "tiny-b" in page.text
    inner = httpx.get(f"{router.url}/dashboard/replica/2")
    assert inner.status_code == 200 and "EventSource" in inner.text
    with httpx.stream("GET", f"{router.url}/dashboard/replica/2/events", timeout=30) as r:
        line = next(line for line in r.iter_lines() if line.startswith("data: "))
    frame = json.loads(line[6:])
    assert frame["model"] == "tiny-b" and len(frame["blocks"]) == frame["num_blocks"]
    missing = httpx.get(f"{router.url}/dashboard/replica/9")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "replica"


def test_a_router_with_an_api_key_leaves_only_health_metrics_and_dashboards_open(replicas):
    with AppThread(create_router_app([replicas[0].url], api_key="sk-router", health_interval=60)) as router:
        assert httpx.get(f"{router.url}/v1/models").status_code == 401
        assert httpx.get(f"{router.url}/v1/models", headers={"Authorization": "Bearer sk-router"}).status_code == 200
        for path in ("/health", "/metrics", "/dashboard", "/dashboard/replica/0"):
            assert httpx.get(f"{router.url}{path}").status_code == 200, path
