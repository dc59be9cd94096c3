"""The OpenAI-compatible HTTP server: FastAPI app, auth, errors, and the small endpoints.

    from vllm_engine.serving import create_api_server
    app = create_api_server(model="path/to/model", max_model_len=2048)   # EngineArgs keywords
    uvicorn.run(app, host="127.0.0.1", port=8000)

/v1/completions and /v1/chat/completions live in completions.py and chat.py; the shared request
plumbing (``ServingContext``: tokenizer, model-name and length checks, engine error mapping,
client-disconnect handling, SSE framing) lives here.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_engine import envs
from vllm_engine.engine.async_engine import (
    AsyncEngine, EngineDeadError, QueueFullError, RequestTimeoutError, request_started_at)
from vllm_engine.serving import openapi as oas
from vllm_engine.serving.dashboard import DASHBOARD_PATHS, add_dashboard
from vllm_engine.sampling_params import SamplingParamsError, StructuredOutputsParams
from vllm_engine.serving.metrics import ServerMetrics
from vllm_engine.serving.protocol import (
    APIError, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse, ChatMessage,
    CompletionRequest, CompletionResponse, CompletionStreamResponse, DetokenizeRequest, DetokenizeResponse,
    ModelList, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse, VersionResponse, error_body)

logger = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
RETRY_AFTER_S = 1


def to_api_error(e: BaseException) -> APIError:
    """Maps what the engine raises to the HTTP error the client sees."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(503, f"The server is overloaded: {e} Retry later.", "service_unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), "engine_dead")
    if isinstance(e, RequestTimeoutError):
        return APIError(408, str(e), "timeout_error", code="request_timeout")
    if isinstance(e, ValueError):
        return APIError(400, str(e), "invalid_request_error")
    return APIError(500, f"internal error: {e!r}", "internal_error")


class ServingContext:
    """What every endpoint needs: the engine, the model's facts, and a private tokenizer.

    The tokenizer is a copy used only on one worker thread: HF fast tokenizers are not safe to use
    from two threads at once, and the engine loop thread detokenizes with the engine's own copy.
    ``trust_request_chat_template``: accept a request's own ``chat_template`` (see ``render_chat``).
    """

    def __init__(self, async_engine: AsyncEngine, chat_template: Optional[str] = None,
                 trust_request_chat_template: bool = False) -> None:
        engine = async_engine.engine
        self.async_engine = async_engine
        self.engine = engine
        self.model_name: str = engine.served_model_name
        self.max_model_len: int = engine.max_model_len
        self.generation_config: dict = dict(getattr(engine, "generation_config", None) or {})
        self.chat_template = chat_template
        self.trust_request_chat_template = trust_request_chat_template
        tok = engine.tokenizer
        try:
            self.tokenizer = copy.deepcopy(tok) if tok is not None else None
        except Exception:  # noqa: BLE001 - an uncopyable tokenizer: share it (tokenize on our one thread)
            self.tokenizer = tok
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vllm-engine-tokenizer")
        if tok is not None and hasattr(engine, "structured_output_manager"):
            engine.structured_output_manager()  # made here, before two threads could race to make it
        self.created = int(time.time())

    async def in_tokenizer_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs tokenizer work off the event loop (long prompts would stall every stream)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{self.model_name}`).",
                           "invalid_request_error", "model", "model_not_found")

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise APIError(400, "This model has no tokenizer: send token ids.", param="prompt")
        return self.tokenizer

    async def tokenize(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        tok = self.require_tokenizer()
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): the tokenizer raises TypeError
            raise APIError(400, f"The text is not valid Unicode: {e.reason} at position {e.start}.", param=param) from e
        return list(await self.in_tokenizer_thread(tok.encode, text, add_special_tokens=add_special_tokens))

    async def detokenize(self, ids: list[int]) -> str:
        tok = self.require_tokenizer()
        return await self.in_tokenizer_thread(tok.decode, ids)

    def effective_chat_template(self, chat_template: Optional[str] = None) -> Optional[str]:
        """The template a chat renders with: the request's, else the server's, else the model's."""
        return chat_template or self.chat_template or getattr(self.tokenizer, "chat_template", None)

    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                          continue_final_message: bool, chat_template: Optional[str] = None,
                          tools: Optional[list[dict]] = None) -> str:
        """The conversation as prompt text, through the request's, the server's or the model's template;
        ``tools`` (OpenAI definitions) go to the template, or into a system prompt when it has no tool
        support (serving/chat_tools.py).

        A request's template is refused unless the server trusts them: the tokenizer thread runs it,
        and a template can loop for minutes (``range`` in a nested loop), stalling every request.
        """
        from vllm_engine.serving.chat_tools import conversation, template_supports_tools

        tok = self.require_tokenizer()
        if chat_template is not None and not self.trust_request_chat_template:
            raise APIError(400, "chat_template in a request is disabled: the server runs only its own or the "
                                "model's template (start it with --trust-request-chat-template to allow them).",
                           param="chat_template")
        template = chat_template or self.chat_template
        if template is None and not getattr(tok, "chat_template", None):
            raise APIError(400, "This model has no chat template; start the server with --chat-template FILE.",
                           param="messages")
        if add_generation_prompt and continue_final_message:
            raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true.",
                           param="continue_final_message")
        if continue_final_message and messages[-1].role != "assistant":
            raise APIError(400, "continue_final_message needs the last message to be from the assistant.",
                           param="continue_final_message")
        native_tools = template_supports_tools(self.effective_chat_template(chat_template))
        convo = conversation(messages, tools, native_tools)
        try:
            return await self.in_tokenizer_thread(
                tok.apply_chat_template, convo, chat_template=template, tokenize=False,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tools=tools if native_tools else None)
        except APIError:
            raise
        except Exception as e:  # template errors (e.g. "roles must alternate") are the request's fault
            raise APIError(400, f"chat template error: {e}", param="messages") from e

    async def compile_grammar(self, params: StructuredOutputsParams, param: str) -> None:
        """Compiles a request's constraint before it is queued (the engine's cache keeps the result), so
        a bad schema, regex or grammar is a 400 naming the request's ``param``; the compile runs on the
        grammar thread, never on the event loop or the engine loop."""
        try:
            manager = self.engine.structured_output_manager()
            await asyncio.wrap_future(manager.submit(params))
        except SamplingParamsError as e:
            raise APIError(400, str(e.renamed(param)), param=param) from e
        except ValueError as e:  # no tokenizer, xgrammar not installed
            raise APIError(400, str(e), param=param) from e

    def check_lengths(self, num_prompt_tokens: int, max_tokens: Optional[int], param: str = "max_tokens") -> None:
        """400 when the prompt (plus an explicitly requested max_tokens) cannot fit in the context."""
        if num_prompt_tokens == 0:
            raise APIError(400, "The prompt is empty (0 tokens).", param="prompt")
        if num_prompt_tokens >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the "
                           f"prompt has {num_prompt_tokens} tokens (at least one token must be generated).",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is not None and num_prompt_tokens + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                           f"{max_tokens} in the completion). Reduce the prompt or {param}.",
                           param=param, code="context_length_exceeded")


async def run_until_disconnect(raw_request: Request, work: Awaitable[T]) -> Union[T, Response]:
    """Awaits ``work``, cancelling it (which aborts its engine requests) if the client goes away;
    then answers 499, which nobody reads."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    cancelled = False
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            cancelled = True
            # A cancelled task is not done until its finally blocks (which abort the engine
            # requests) have run: wait for that before looking at it.
            await asyncio.wait({task})
    if cancelled:
        if not task.cancelled():
            task.exception()  # whatever it ended with, the client is gone: retrieve it, report nothing
        return Response(status_code=499)
    return task.result()


def sse(payload: Union[dict, str]) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def sse_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Frames chunks as SSE, ending with ``[DONE]``; an error mid-stream becomes an error event first."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - the 200 is already sent: report in-band
        err = to_api_error(e)
        if err.status >= 500:
            logger.error("stream failed: %s", err.message)
        yield sse(err.body())
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    yield sse("[DONE]")


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleaves several async iterators as (index, item); closing it closes them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
            await queue.put((i, done))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for it in streams:
            close = getattr(it, "close", None)
            if close is not None:
                close()


class ErrorResponseMiddleware:
    """An exception an endpoint raises before its response started becomes that error's JSON
    response here (``to_api_error``: the engine's timeouts 408, overload and death 503, bad values
    400, the rest 500). Starlette's handler for ``Exception`` would send the response and then
    re-raise, and uvicorn closes the connection on that, which raced the response out of the
    client's hands under load (the client saw a connection reset instead of a 408)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - every error gets its HTTP answer
            if started:
                raise
            err = to_api_error(exc)
            if err.status >= 500:
                logger.exception("request failed", exc_info=exc)
            await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)


class APIKeyMiddleware:
    """Bearer-token check on every route except /health, /metrics and the dashboard (pure ASGI, so streaming
    responses and disconnect detection pass through untouched).

    ``Authorization: Bearer KEY``: the scheme is case-insensitive (RFC 7235: ``bearer KEY`` works
    too); the key is compared in constant time.
    """

    OPEN_PATHS = oas.OPEN_PATHS + DASHBOARD_PATHS
    OPEN_PREFIXES: tuple[str, ...] = ()  # the router adds its replicas' dashboards

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    def authorized(self, header: bytes) -> bool:
        scheme, _, key = header.partition(b" ")
        key_ok = hmac.compare_digest(key.lstrip(b" "), self.expected)  # 1*SP may separate scheme and key
        return key_ok and scheme.lower() == b"bearer"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or path in self.OPEN_PATHS or path.startswith(self.OPEN_PREFIXES)
                or scope.get("method") == "OPTIONS"):
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
        if not self.authorized(given):
            body = error_body("Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                              "invalid_request_error", None, "invalid_api_key")
            resp = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"Invalid JSON in the request body: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


def create_app(async_engine: AsyncEngine, chat_template: Optional[str] = None, api_key: Optional[str] = None,
               metrics: Optional[ServerMetrics] = None, owns_engine: bool = False,
               trust_request_chat_template: bool = False) -> FastAPI:
    """The FastAPI app serving ``async_engine``; ``owns_engine``: shut it down with the app;
    ``trust_request_chat_template``: accept a ``chat_template`` field in chat requests."""
    from vllm_engine import __version__
    from vllm_engine.serving.chat import create_chat_completion
    from vllm_engine.serving.completions import create_completion

    ctx = ServingContext(async_engine, chat_template, trust_request_chat_template)
    if metrics is None:
        metrics = ServerMetrics(ctx.model_name, lambda: async_engine.last_stats)
        if async_engine.stat_logger is None:
            async_engine.stat_logger = metrics

    app = FastAPI(title="vllm-engine", version=__version__, lifespan=_lifespan(async_engine, owns_engine),
                  description="An OpenAI-compatible API serving one model (docs/serving.md).")
    app.state.ctx, app.state.async_engine, app.state.metrics = ctx, async_engine, metrics
    app.add_middleware(ErrorResponseMiddleware)  # inside the API-key check, outside the routes
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, 400), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, exc.status_code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/health", response_class=Response, responses={
        200: {"description": "The engine is running (empty body).", "content": None},
        503: oas.error("The engine died (code `engine_dead`); while `serve` is still loading the model, every "
                       "route answers 503 with code `starting` (serving/startup.py)."),
    })
    async def health() -> Response:
        """Liveness: 200 while the engine can serve requests."""
        if async_engine.is_healthy:
            return Response(status_code=200)
        return JSONResponse(error_body(f"engine is dead: {async_engine.dead_error}", "engine_dead"), status_code=503)

    @app.get("/version", response_model=VersionResponse, responses=oas.UNAUTHORIZED)
    async def version() -> dict:
        """The server's version."""
        return {"version": __version__}

    @app.get("/v1/models", response_model=ModelList, responses=oas.UNAUTHORIZED)
    async def models() -> dict:
        """The one served model."""
        card = {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "vllm-engine",
                "root": getattr(ctx.engine.model_config, "model", ctx.model_name), "parent": None,
                "max_model_len": ctx.max_model_len}
        return {"object": "list", "data": [card]}

    prometheus_text = {"text/plain": {"schema": {"type": "string"}}}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format.", "content": prometheus_text}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics (docs/serving.md lists them)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", response_model=TokenizeResponse,
              responses={**oas.BAD_REQUEST, **oas.UNAUTHORIZED, **oas.MODEL_NOT_FOUND})
    async def tokenize(req: Union[TokenizeCompletionRequest, TokenizeChatRequest]) -> dict:
        """A prompt, or messages through the chat template, as token ids."""
        ctx.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            text = await ctx.render_chat(req.messages, req.add_generation_prompt, req.continue_final_message)
            param = "messages"
        else:
            text, param = req.prompt, "prompt"
        ids = await ctx.tokenize(text, req.add_special_tokens, param)
        return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}

    @app.post("/detokenize", response_model=DetokenizeResponse,
              responses={**oas.BAD_REQUEST, **oas.UNAUTHORIZED, **oas.MODEL_NOT_FOUND})
    async def detokenize(req: DetokenizeRequest) -> dict:
        """Token ids as text."""
        ctx.check_model(req.model)
        vocab = ctx.engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {vocab}).", param="tokens")
        return {"prompt": await ctx.detokenize(req.tokens)}

    @app.post("/v1/completions", response_model=None, openapi_extra=oas.json_body(CompletionRequest),
              responses=oas.generation_responses(CompletionResponse, CompletionStreamResponse))
    async def completions(raw_request: Request) -> Response:
        """Completes prompts (text, token ids, or batches of either); streams with `"stream": true`."""
        request_started_at.set(time.time())  # --request-timeout counts from here
        return await create_completion(ctx, await _parse(raw_request, CompletionRequest), raw_request)

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=oas.json_body(ChatCompletionRequest),
              responses=oas.generation_responses(ChatCompletionResponse, ChatCompletionStreamResponse))
    async def chat_completions(raw_request: Request) -> Response:
        """Answers a conversation through the chat template; streams with `"stream": true`."""
        request_started_at.set(time.time())  # --request-timeout counts from here
        return await create_chat_completion(ctx, await _parse(raw_request, ChatCompletionRequest), raw_request)

    add_dashboard(app, async_engine, metrics)
    oas.install_openapi(app, api_key=bool(api_key))
    return app


async def _parse(raw_request: Request, model: type[M]) -> M:
    """Parses the JSON body ourselves (FastAPI would read it again for the disconnect watcher); the
    OpenAPI document declares ``model`` as the body (``openapi.json_body``)."""
    from pydantic import ValidationError

    body = await raw_request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from e


def _lifespan(async_engine: AsyncEngine, owns_engine: bool) -> Callable:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_engine:
            async_engine.shutdown()

    return lifespan


def create_api_server(model: Optional[str] = None, *, chat_template: Optional[str] = None,
                      api_key: Optional[str] = None, trust_request_chat_template: bool = False,
                      request_timeout: Optional[float] = None, **engine_kwargs: Any) -> FastAPI:
    """Builds the engine (``EngineArgs`` keywords) and returns the FastAPI app for ``uvicorn.run``.

    ``chat_template``: a Jinja template string overriding the model's. ``api_key``: require
    ``Authorization: Bearer <key>`` (default: $VLLM_ENGINE_API_KEY if set).
    ``trust_request_chat_template``: accept a ``chat_template`` field in chat requests.
    ``request_timeout``: seconds a request may take from its arrival (``--request-timeout``; None: no limit).
    """
    from vllm_engine.engine.engine import Engine

    engine = Engine(model=model, **engine_kwargs)
    async_engine = AsyncEngine(engine, request_timeout=request_timeout)
    api_key = api_key if api_key is not None else envs.api_key()
    return create_app(async_engine, chat_template=chat_template, api_key=api_key, owns_engine=True,
                      trust_request_chat_template=trust_request_chat_template)
