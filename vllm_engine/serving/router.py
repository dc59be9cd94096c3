"""``vllm-engine router``: one OpenAI endpoint in front of several ``vllm-engine serve`` replicas.

    app = create_router_app(["http://127.0.0.1:8001", "http://127.0.0.1:8002"])
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routing of POST /v1/completions and /v1/chat/completions (and /tokenize, /detokenize, by model only;
not counted in routed_requests_total), in order:

1. by ``model``: only healthy replicas serving it (404 ``model_not_found`` if none serves it, 503 if
   none of those is healthy); a request without ``model`` may go to any replica;
2. by prefix-cache affinity: the prompt's leading text is hashed in chunks of ``PREFIX_CHUNK_CHARS``
   characters (chained, like the engine's block hashes); the replica that last served the longest
   known prefix gets the request, so requests sharing a long prefix (a system prompt, a document)
   land where it is cached, unless that replica's outstanding tokens exceed the least loaded
   one's by more than ``balance_slack_tokens``;
3. otherwise the replica with the fewest outstanding tokens (estimated: prompt characters / 4 plus
   ``max_tokens``, times ``n``, for every request in flight), then fewest requests in flight, then
   fewest requests routed so far (round robin when idle).

Failures: a replica that cannot be reached, answers 502/503/504, or fails before the first server-sent
event with output (streaming: a chat's role chunk is held back until then) or before its whole
body (non-streaming) reached the router is marked
(unreachable or engine dead: unhealthy) and the request is retried on another replica; nothing had
reached the client. When every replica failed, the client gets the last replica's own error answer
(a full queue's 503 + Retry-After), or a 502 ``replicas_failed`` if none answered. A stream that fails after that ends with an error event ``{"error": {..., "code":
"replica_failed"}}`` and ``data: [DONE]``. The router forwards whole events only, never half of one.

Health: every ``health_interval`` seconds each replica's /health and /v1/models are read; a replica
comes back once it answers again. ``GET /v1/models`` lists every healthy replica's models, ``GET
/metrics`` every replica's metrics with a ``replica`` label plus the router's own
(``vllm_engine_router:*``), ``GET /router/replicas`` the router's view of each replica (JSON), ``GET
/dashboard`` links to each replica's live dashboard, relayed at ``/dashboard/replica/{i}``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import html
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from vllm_engine.serving.protocol import APIError, error_body

logger = logging.getLogger("vllm_engine.serving.router")

PREFIX_CHUNK_CHARS = 128  # ~32 tokens: prefixes are matched in whole chunks of this many characters
MAX_PREFIX_CHARS = 16384  # only the leading characters matter for affinity
AFFINITY_ENTRIES = 200_000  # prefix hashes remembered (least recently used forgotten first)
CHARS_PER_TOKEN = 4
DEFAULT_MAX_TOKENS = {"/v1/completions": 16, "/v1/chat/completions": 256}
RETRY_STATUSES = {502, 503, 504}
FORWARDED_REQUEST_HEADERS = ("authorization", "content-type", "accept", "x-request-id")
FORWARDED_RESPONSE_HEADERS = ("content-type", "retry-after", "www-authenticate", "cache-control", "x-request-id")
REPLICA_HEADER = "x-vllm-engine-replica"


@dataclass
class Replica:
    """The router's view of one backend server (mutated on the router's event loop only)."""

    url: str
    healthy: bool = False
    models: list[dict] = field(default_factory=list)  # the replica's /v1/models cards
    in_flight: int = 0
    outstanding_tokens: int = 0
    routed: dict[str, int] = field(default_factory=lambda: {"prefix": 0, "load": 0})
    failed_attempts: int = 0  # requests retried elsewhere after failing here
    stream_failures: int = 0  # streams that failed after their first event
    last_error: Optional[str] = None
    pid: Optional[int] = None  # when the router launched it

    @property
    def label(self) -> str:
        return self.url.split("://", 1)[-1]

    @property
    def model_ids(self) -> set[str]:
        return {m["id"] for m in self.models}

    def status(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "models": sorted(self.model_ids),
                "in_flight": self.in_flight, "outstanding_tokens": self.outstanding_tokens,
                "routed": dict(self.routed), "failed_attempts": self.failed_attempts,
                "stream_failures": self.stream_failures, "last_error": self.last_error, "pid": self.pid}


def prompt_text(path: str, body: dict) -> str:
    """The request's prompt as text, for prefix hashing: a completion's (first) prompt, token ids as
    text, or a chat's messages rendered role by role."""
    if "messages" in body:  # a chat, or /tokenize of messages
        parts = []
        for m in body.get("messages") or []:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<{m.get('role')}>{content if isinstance(content, str) else ''}")
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: the first prompt decides
    if isinstance(prompt, list):
        return ",".join(str(t) for t in prompt)
    return prompt if isinstance(prompt, str) else ""


def prefix_hashes(model: Optional[str], text: str) -> list[bytes]:
    """Chained hashes of the text's leading whole chunks: hash i covers ``text[:(i + 1) * CHUNK]``."""
    hashes, prev = [], (model or "").encode()
    text = text[:MAX_PREFIX_CHARS]
    for start in range(0, len(text) - PREFIX_CHUNK_CHARS + 1, PREFIX_CHUNK_CHARS):
        chunk = text[start:start + PREFIX_CHUNK_CHARS].encode("utf-8", "surrogatepass")
        prev = hashlib.blake2b(prev + chunk, digest_size=16).digest()
        hashes.append(prev)
    return hashes


def estimate_tokens(path: str, body: dict, text: str) -> int:
    """Outstanding-token estimate of a request: prompt characters / 4 plus its maximum output, per sample."""
    if path not in DEFAULT_MAX_TOKENS:  # /tokenize, /detokenize: no engine work
        return 0
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS[path]
    n = body.get("n") or 1
    prompts = body.get("prompt")
    num_prompts = len(prompts) if isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list)) else 1
    try:
        return num_prompts * int(n) * (len(text) // CHARS_PER_TOKEN + int(max_tokens))
    except (TypeError, ValueError):  # a malformed field: the replica's 400 will say which
        return len(text) // CHARS_PER_TOKEN


class Router:
    """Replica choice, affinity and health (no HTTP serving: ``create_router_app`` adds that)."""

    def __init__(self, backends: Iterable[str], balance_slack_tokens: int = 2048, health_interval: float = 2.0,
                 api_key: Optional[str] = None) -> None:
        self.replicas = [Replica(url.rstrip("/")) for url in backends]
        if not self.replicas:
            raise ValueError("the router needs at least one --backend")
        self.balance_slack_tokens = balance_slack_tokens
        self.health_interval = health_interval
        self.api_key = api_key
        self.affinity: collections.OrderedDict[bytes, Replica] = collections.OrderedDict()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    # ---- choosing -----------------------------------------------------------------------------------
    def pick(self, model: Optional[str], hashes: list[bytes], exclude: set[str]) -> tuple[Replica, str]:
        """The replica for a request and why ("prefix" or "load"); APIError 404/503 when there is none."""
        serving = [r for r in self.replicas if model is None or model in r.model_ids]
        if not serving:
            known = sorted({m for r in self.replicas for m in r.model_ids})
            raise APIError(404, f"The model `{model}` does not exist (served here: {', '.join(known) or 'none yet'}).",
                           "invalid_request_error", "model", "model_not_found")
        candidates = [r for r in serving if r.healthy and r.url not in exclude]
        if not candidates:
            raise APIError(503, f"No healthy replica serves `{model}` now; retry later." if model else
                           "No healthy replica now; retry later.", "service_unavailable",
                           headers={"Retry-After": "1"})
        least = min(candidates, key=lambda r: (r.outstanding_tokens, r.in_flight, sum(r.routed.values())))
        for h in reversed(hashes):
            owner = self.affinity.get(h)
            if owner is not None:
                if owner in candidates and owner.outstanding_tokens <= least.outstanding_tokens + self.balance_slack_tokens:
                    return owner, "prefix"
                break
        return least, "load"

    def remember(self, hashes: list[bytes], replica: Replica) -> None:
        """The prompt's prefixes are now cached on ``replica``."""
        for h in hashes:
            self.affinity[h] = replica
            self.affinity.move_to_end(h)
        while len(self.affinity) > AFFINITY_ENTRIES:
            self.affinity.popitem(last=False)

    def mark_unreachable(self, replica: Replica, error: str) -> None:
        if replica.healthy:
            logger.warning("replica %s is down: %s", replica.url, error)
        replica.healthy, replica.last_error = False, error

    # ---- health -------------------------------------------------------------------------------------
    def backend_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def check(self, replica: Replica) -> None:
        """Reads the replica's /health and /v1/models; updates its state."""
        try:
            r = await self.client.get(f"{replica.url}/health", timeout=5.0)
            if r.status_code != 200:
                raise RuntimeError(f"/health answered {r.status_code}")
            m = await self.client.get(f"{replica.url}/v1/models", headers=self.backend_headers(), timeout=5.0)
            m.raise_for_status()
            replica.models = list(m.json()["data"])
        except Exception as e:  # noqa: BLE001 - any failure means: not serving now
            self.mark_unreachable(replica, f"health check: {e!r}")
            return
        if not replica.healthy:
            logger.info("replica %s is up, serving %s", replica.url, sorted(replica.model_ids))
        replica.healthy, replica.last_error = True, None

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await self.check_all()

    # ---- models and metrics -------------------------------------------------------------------------
    def model_cards(self) -> list[dict]:
        cards: dict[str, dict] = {}
        for r in self.replicas:
            if r.healthy:
                for card in r.models:
                    cards.setdefault(card["id"], card)
        return list(cards.values())

    async def scrape(self, replica: Replica) -> Optional[str]:
        try:
            r = await self.client.get(f"{replica.url}/metrics", timeout=5.0)
            r.raise_for_status()
            return r.text
        except Exception:  # noqa: BLE001 - a replica that cannot be scraped shows as replica_healthy 0
            return None

    async def metrics_text(self) -> bytes:
        texts = await asyncio.gather(*(self.scrape(r) for r in self.replicas))
        families = merge_replica_metrics({r.label: t for r, t in zip(self.replicas, texts) if t is not None})
        return generate_latest(_Families([*families, *self.own_metrics()]))  # type: ignore[arg-type]

    def own_metrics(self) -> list[Metric]:
        p, lab = "vllm_engine_router:", ["replica"]
        healthy = GaugeMetricFamily(p + "replica_healthy", "1 while the replica passes its health checks.", labels=lab)
        in_flight = GaugeMetricFamily(p + "replica_in_flight_requests", "Requests in flight on the replica.",
                                      labels=lab)
        outstanding = GaugeMetricFamily(p + "replica_outstanding_tokens",
                                        "Estimated tokens still to process on the replica (prompt + max output).",
                                        labels=lab)
        routed = CounterMetricFamily(p + "routed_requests", "Generation requests routed to the replica, by reason.",
                                     labels=["replica", "reason"])
        failed = CounterMetricFamily(p + "failed_attempts", "Requests that failed on the replica before any byte "
                                     "reached the client (retried elsewhere).", labels=lab)
        broken = CounterMetricFamily(p + "stream_failures", "Streams that failed on the replica after their first "
                                     "event (the client got an error event).", labels=lab)
        for r in self.replicas:
            healthy.add_metric([r.label], 1.0 if r.healthy else 0.0)
            in_flight.add_metric([r.label], r.in_flight)
            outstanding.add_metric([r.label], r.outstanding_tokens)
            for reason, count in r.routed.items():
                routed.add_metric([r.label, reason], count)
            failed.add_metric([r.label], r.failed_attempts)
            broken.add_metric([r.label], r.stream_failures)
        return [healthy, in_flight, outstanding, routed, failed, broken]


class _Families:
    """What ``generate_latest`` reads: an object whose ``collect()`` yields metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_replica_metrics(texts: dict[str, str]) -> list[Metric]:
    """Every replica's metric families as one set, each sample labelled ``replica``."""
    merged: dict[str, Metric] = {}
    for label, text in texts.items():
        for fam in text_string_to_metric_families(text):
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples.extend(Sample(s.name, {"replica": label, **s.labels}, s.value, s.timestamp, s.exemplar)
                               for s in fam.samples)
    return list(merged.values())


# ---- the HTTP side ----------------------------------------------------------------------------------
class _Attempt:
    """One try of a request on one replica: counts it in flight until ``release``."""

    def __init__(self, replica: Replica, cost: int) -> None:
        self.replica, self.cost, self.released = replica, cost, False
        replica.in_flight += 1
        replica.outstanding_tokens += cost

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.replica.in_flight -= 1
            self.replica.outstanding_tokens -= self.cost


class ReplicaFailed(Exception):
    """This attempt failed before anything reached the client: try another replica. ``answer``: the
    replica's own error response (a 503 of a full queue), given to the client if no replica does better."""

    def __init__(self, message: str, answer: Optional[Response] = None) -> None:
        super().__init__(message)
        self.answer = answer


def _response_headers(resp: httpx.Response, replica: Replica) -> dict[str, str]:
    headers = {k: v for k, v in resp.headers.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}
    headers[REPLICA_HEADER] = replica.url
    return headers


async def _sse_events(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The response body cut into whole server-sent events (each ending with a blank line)."""
    buf = b""
    async for chunk in resp.aiter_bytes():
        buf += chunk
        while (end := buf.find(b"\n\n")) >= 0:
            yield buf[:end + 2]
            buf = buf[end + 2:]
    if buf.strip():
        raise httpx.RemoteProtocolError("the stream ended inside an event")


def _is_preamble(event: bytes) -> bool:
    """Whether ``event`` carries no output yet: a chat stream's opening chunk (role, empty content).
    The router holds such events back, so that "nothing reached the client" lasts until the first token."""
    if not event.startswith(b"data: {"):
        return False
    try:
        choices = json.loads(event[6:]).get("choices")
    except ValueError:
        return False
    return bool(choices) and all(
        c.get("finish_reason") is None and not c.get("logprobs") and set(c.get("delta") or {}) <= {"role", "content"}
        and not (c.get("delta") or {}).get("content") and "delta" in c for c in choices)


def _error_event(message: str) -> bytes:
    body = error_body(message, "server_error", None, "replica_failed")
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


async def _try_replica(router: Router, attempt: _Attempt, path: str, body: bytes, headers: dict) -> Response:
    """Sends the request to ``attempt.replica``; raises ReplicaFailed while nothing reached the client."""
    replica = attempt.replica
    try:
        resp = await router.client.send(router.client.build_request("POST", replica.url + path, content=body,
                                                                    headers=headers), stream=True)
    except httpx.TransportError as e:
        router.mark_unreachable(replica, repr(e))
        raise ReplicaFailed(f"replica {replica.url} unreachable: {e!r}") from e
    try:
        if resp.status_code in RETRY_STATUSES:
            text = (await resp.aread()).decode(errors="replace")
            if "engine_dead" in text:
                router.mark_unreachable(replica, text[:200])
            answer = Response(text, resp.status_code, _response_headers(resp, replica))
            raise ReplicaFailed(f"replica {replica.url} answered {resp.status_code}: {text[:200]}", answer)
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            content = await resp.aread()
            await resp.aclose()
            return Response(content, resp.status_code, _response_headers(resp, replica))
        events = _sse_events(resp)
        first = await events.__anext__()
        while _is_preamble(first):  # a chat's role chunk: hold it until a token comes (or retry elsewhere)
            first += await events.__anext__()
    except (httpx.TransportError, StopAsyncIteration) as e:
        await resp.aclose()
        router.mark_unreachable(replica, repr(e))
        raise ReplicaFailed(f"replica {replica.url} failed before its first event: {e!r}") from e
    except BaseException:
        await resp.aclose()
        raise
    return _RelayResponse(_relay(router, replica, first, events), attempt, resp)


async def _relay(router: Router, replica: Replica, first: bytes, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Forwards a stream's events; a failure after the first one becomes an error event."""
    yield first
    try:
        async for event in events:
            yield event
    except httpx.TransportError as e:
        replica.stream_failures += 1
        router.mark_unreachable(replica, repr(e))
        logger.error("stream from %s failed mid-way: %r", replica.url, e)
        yield _error_event(f"The replica serving this request ({replica.label}) failed mid-stream: {e!r}")


class _RelayResponse(StreamingResponse):
    """A relayed stream that releases its attempt and closes the replica's response however it ends
    (also when the client left before the first event was sent, and the body never started)."""

    def __init__(self, content: AsyncIterator[bytes], attempt: _Attempt, resp: httpx.Response) -> None:
        super().__init__(content, resp.status_code, _response_headers(resp, attempt.replica))
        self.attempt, self.upstream = attempt, resp

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.attempt.release()
            await self.upstream.aclose()


async def proxy(router: Router, path: str, body: bytes, request_headers: Any) -> Response:
    """Routes one generation request (module docstring), retrying on other replicas until one answers."""
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise APIError(400, f"Invalid JSON in the request body: {e}") from e
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.")
    model = payload.get("model") if isinstance(payload.get("model"), str) else None
    text = prompt_text(path, payload)
    hashes = prefix_hashes(model, text)
    cost = estimate_tokens(path, payload, text)
    headers = {k: v for k, v in request_headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
    tried: set[str] = set()
    failures: list[str] = []
    last_answer: Optional[Response] = None
    while True:
        try:
            replica, reason = router.pick(model, hashes, tried)
        except APIError as e:
            if not failures:
                raise
            if last_answer is not None:  # e.g. every replica's queue is full: their 503 + Retry-After
                return last_answer
            raise APIError(502 if e.status == 503 else e.status, "Every replica failed: " + "; ".join(failures),
                           "server_error", code="replicas_failed") from e
        tried.add(replica.url)
        attempt = _Attempt(replica, cost)
        try:
            resp = await _try_replica(router, attempt, path, body, headers)
        except ReplicaFailed as e:
            attempt.release()
            replica.failed_attempts += 1
            failures.append(str(e))
            last_answer = e.answer or last_answer
            logger.warning("%s; retrying elsewhere", e)
            continue
        except BaseException:
            attempt.release()
            raise
        if path in DEFAULT_MAX_TOKENS:  # a generation request (not /tokenize)
            replica.routed[reason] += 1
            if resp.status_code < 400:  # its prefix is cached there now
                router.remember(hashes, replica)
        if not isinstance(resp, _RelayResponse):
            attempt.release()
        return resp


def create_router_app(backends: Iterable[str], *, api_key: Optional[str] = None, balance_slack_tokens: int = 2048,
                      health_interval: float = 2.0, pids: Optional[dict[str, int]] = None) -> FastAPI:
    """The router's FastAPI app over ``backends`` (base URLs of ``vllm-engine serve`` servers).

    ``api_key``: clients must send it (except to /health and /metrics), and the router sends it to
    the replicas for its own calls (clients' Authorization headers are forwarded as they are).
    ``pids``: url -> process id of replicas this process launched (shown in /router/replicas).
    """
    from contextlib import asynccontextmanager

    from starlette.exceptions import HTTPException as StarletteHTTPException

    from vllm_engine.serving.api_server import APIKeyMiddleware, run_until_disconnect

    from fastapi.responses import HTMLResponse

    router = Router(backends, balance_slack_tokens, health_interval, api_key)
    for r in router.replicas:
        r.pid = (pids or {}).get(r.url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await router.check_all()
        task = asyncio.create_task(router.health_loop())
        yield
        task.cancel()
        await router.client.aclose()

    app = FastAPI(title="vllm-engine router", lifespan=lifespan,
                  description="One OpenAI-compatible endpoint in front of several vllm-engine servers.")
    app.state.router = router
    if api_key:
        class RouterKeyMiddleware(APIKeyMiddleware):
            OPEN_PREFIXES = ("/dashboard/replica/",)  # the replicas' dashboards are open like their own

        app.add_middleware(RouterKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, exc.status_code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.post("/v1/completions", response_model=None)
    async def completions(raw_request: Request) -> Response:
        body = await raw_request.body()
        return await run_until_disconnect(raw_request, proxy(router, "/v1/completions", body, raw_request.headers))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(raw_request: Request) -> Response:
        body = await raw_request.body()
        return await run_until_disconnect(raw_request, proxy(router, "/v1/chat/completions", body,
                                                             raw_request.headers))

    async def tokenizer_route(raw_request: Request) -> Response:
        body = await raw_request.body()
        return await proxy(router, raw_request.url.path, body, raw_request.headers)

    app.add_api_route("/tokenize", tokenizer_route, methods=["POST"], response_model=None)
    app.add_api_route("/detokenize", tokenizer_route, methods=["POST"], response_model=None)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": router.model_cards()}

    @app.get("/health", response_class=Response)
    async def health() -> Response:
        if any(r.healthy for r in router.replicas):
            return Response(status_code=200)
        return JSONResponse(error_body("no healthy replica", "service_unavailable"), status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await router.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router/replicas")
    async def replicas() -> dict:
        return {"time": time.time(), "replicas": [r.status() for r in router.replicas]}

    def replica_at(i: int) -> Replica:
        if not 0 <= i < len(router.replicas):
            raise APIError(404, f"no replica {i} (there are {len(router.replicas)})", param="replica")
        return router.replicas[i]

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        """Links to each replica's live dashboard (relayed, so that one endpoint shows them all)."""
        rows = "".join(
            f'<li><a href="dashboard/replica/{i}">replica {i}</a> {html.escape(r.url)} ({", ".join(sorted(r.model_ids))}'
            f') {"healthy" if r.healthy else "DOWN"}, {r.in_flight} in flight</li>' for i, r in enumerate(router.replicas))
        return HTMLResponse(f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="5">'
                            f'<title>vllm-engine router</title><h1>vllm-engine router</h1><ul>{rows}</ul>')

    @app.get("/dashboard/replica/{i}", response_class=HTMLResponse, include_in_schema=False)
    async def replica_dashboard(i: int) -> Response:
        r = await router.client.get(f"{replica_at(i).url}/dashboard", timeout=10.0)
        return HTMLResponse(r.text, r.status_code)

    @app.get("/dashboard/replica/{i}/events", include_in_schema=False)
    async def replica_dashboard_events(i: int) -> StreamingResponse:
        url = f"{replica_at(i).url}/dashboard/events"

        async def relay() -> AsyncIterator[bytes]:
            async with router.client.stream("GET", url) as upstream:
                async for chunk in upstream.aiter_raw():
                    yield chunk

        return StreamingResponse(relay(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
