"""AsyncEngine: drives a synchronous ``Engine`` from one background thread for asyncio callers.

The engine's ``step()`` is synchronous and not thread-safe, so exactly one thread (the *loop thread*)
ever touches it: it applies queued commands (add / abort) between steps, runs ``step()`` while there
is work, and sleeps on an event when idle. Outputs are handed to each caller's event loop with one
``loop.call_soon_threadsafe`` per step, into per-request ``asyncio.Queue`` s, so the event loop stays
responsive while a (possibly long) step runs.

    async for out in async_engine.generate(prompt, params, request_id):   # streaming (cumulative outputs)
        ...
    final = await async_engine.generate_async(prompt, params)              # just the final RequestOutput

Closing a ``generate`` iterator early (client disconnect, task cancelled) aborts its request, which
frees its KV blocks at once. An exception in the loop fails every in-flight request with
``EngineDeadError`` and marks the engine dead (``is_healthy`` is False); callbacks registered with
``add_dead_callback`` run (the server uses one to exit non-zero).

``request_timeout`` (seconds, None = off; the server's ``--request-timeout``): a request still
unfinished that long after ``request_started_at`` (the server sets it as the HTTP request arrives;
else the request's arrival time) is refused or aborted (its KV blocks freed at once, even if nobody reads
its stream) and its stream raises ``RequestTimeoutError``. One timer per request on its caller's event
loop; the loop thread is untouched.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Protocol

from vllm_engine.outputs import RequestOutput
from vllm_engine.sampling_params import SamplingParams

try:  # the engine module defines it; keep one class so `except QueueFullError` works everywhere
    from vllm_engine.engine.engine import QueueFullError
except ImportError:  # pragma: no cover - only while the engine module is missing

    class QueueFullError(RuntimeError):  # type: ignore[no-redef]
        """Too many requests are waiting (``max_waiting_requests``)."""


logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "QueueFullError", "RequestFailedError", "RequestTimeoutError",
           "StatLogger"]


class EngineDeadError(RuntimeError):
    """The engine loop crashed; no request can be served any more (HTTP 503, the server exits)."""


class RequestFailedError(RuntimeError):
    """A fault in this request's own path ended it (``RequestOutput.error``); the engine carries on."""


class RequestTimeoutError(RuntimeError):
    """The request outlived ``AsyncEngine.request_timeout``; it was aborted (HTTP 408 / an error event)."""

    def __init__(self, request_id: str, timeout: float) -> None:
        super().__init__(f"The request exceeded the server's request timeout of {timeout:g} s and was aborted.")
        self.request_id = request_id
        self.timeout = timeout


# When the caller's work on a request began (the server sets it as an HTTP request arrives): a
# request's deadline counts from then, so tokenization and grammar compiles count too. Unset: from
# the request's arrival_time.
request_started_at: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar("request_started_at",
                                                                                     default=None)


class StatLogger(Protocol):
    """Receives, on the loop thread, what the server's metrics need (see ``serving/metrics.py``)."""

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None: ...

    def on_abort(self, request_id: str, now: float) -> None: ...


@dataclass
class _Stream:
    """One request's mailbox on its caller's event loop."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[Any]"
    finished: bool = False
    deadline_timer: Optional[asyncio.TimerHandle] = None


@dataclass
class _Command:
    kind: str  # "add" | "abort"
    args: tuple
    future: Optional[concurrent.futures.Future] = None


class AsyncEngine:
    """Runs ``engine.step()`` on a dedicated thread; ``generate`` streams each request's outputs."""

    def __init__(self, engine: Any, stat_logger: Optional[StatLogger] = None, start: bool = True,
                 request_timeout: Optional[float] = None) -> None:
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout must be a positive number of seconds, not {request_timeout!r}")
        self.engine = engine
        self.stat_logger = stat_logger
        self.request_timeout = request_timeout
        self._streams: dict[str, _Stream] = {}
        self._commands: collections.deque[_Command] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards _streams between the event loop(s) and the loop thread
        self._stopping = False
        self._dead_error: Optional[BaseException] = None
        self._die_lock = threading.Lock()
        self._dead_callbacks: list[Callable[[BaseException], None]] = []
        self._thread: Optional[threading.Thread] = None
        self._live: set[str] = set()  # ids added to the engine and not finished (loop thread only)
        # Latest engine stats, refreshed on the loop thread (get_stats is not thread-safe either).
        self.last_stats = engine.get_stats()
        # A worker rank that dies while the loop is idle (no step waiting on it) must still end the engine.
        add_failure_callback = getattr(engine, "add_failure_callback", None)
        if add_failure_callback is not None:
            add_failure_callback(self._on_executor_failure)
        if start:
            self.start()

    @classmethod
    def from_engine_args(cls, args: Any, **kwargs: Any) -> "AsyncEngine":
        from vllm_engine.engine.engine import Engine

        return cls(Engine.from_engine_args(args), **kwargs)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vllm-engine-loop", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the loop thread (in-flight requests are aborted), then the engine's worker ranks."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        engine_shutdown = getattr(self.engine, "shutdown", None)
        if engine_shutdown is not None:
            engine_shutdown()

    @property
    def is_healthy(self) -> bool:
        return self._dead_error is None and not self._stopping

    @property
    def dead_error(self) -> Optional[BaseException]:
        return self._dead_error

    def add_dead_callback(self, fn: Callable[[BaseException], None]) -> None:
        """``fn(error)`` runs (on the loop thread) when the loop crashes; at once if it already has."""
        self._dead_callbacks.append(fn)
        if self._dead_error is not None:
            fn(self._dead_error)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- public API ---------------------------------------------------------------------------------
    async def add_request(self, prompt: Any, params: Optional[SamplingParams] = None,
                          request_id: Optional[str] = None, priority: int = 0,
                          arrival_time: Optional[float] = None) -> "RequestStream":
        """Queues a request and returns its output stream once the engine accepted it.

        Raises ValueError (bad prompt/params; the message names the field), QueueFullError, or
        EngineDeadError here, before any output: the server turns them into HTTP errors.
        """
        request_id = request_id or uuid.uuid4().hex
        stream = await self._add(request_id, prompt, params, priority, arrival_time)
        return RequestStream(self, stream)

    async def generate(self, prompt: Any, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None, priority: int = 0,
                       arrival_time: Optional[float] = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative RequestOutputs; the last one has ``finished=True``.

        Closing the iterator early (or cancelling the task that awaits it) aborts the request.
        """
        stream = await self.add_request(prompt, params, request_id, priority, arrival_time)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def generate_async(self, prompt: Any, params: Optional[SamplingParams] = None,
                             request_id: Optional[str] = None, priority: int = 0) -> RequestOutput:
        """Runs one request to completion and returns its final RequestOutput."""
        final: Optional[RequestOutput] = None
        async for out in self.generate(prompt, params, request_id, priority):
            final = out
        assert final is not None
        return final

    async def abort(self, request_id: str) -> None:
        """Aborts a request and waits until the engine has freed its KV blocks; its stream just ends."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.finished = True
            stream.queue.put_nowait(None)  # ends the consumer's iteration (we run on its loop)
        fut = self._submit("abort", (request_id,))
        await asyncio.wrap_future(fut)

    async def get_stats(self) -> Any:
        """Fresh engine stats, taken on the loop thread."""
        return await asyncio.wrap_future(self._submit("stats", ()))

    async def snapshot(self) -> dict:
        """``Engine.snapshot()`` (queues, request progress, KV block map), taken on the loop thread between steps."""
        return await asyncio.wrap_future(self._submit("snapshot", ()))

    # ---- event-loop side helpers ----------------------------------------------------------------------
    def _submit(self, kind: str, args: tuple) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._dead_error is not None:
            fut.set_exception(EngineDeadError(f"the engine is dead: {self._dead_error!r}"))
            return fut
        if self._stopping:
            fut.set_exception(EngineDeadError("the engine is shutting down"))
            return fut
        self._commands.append(_Command(kind, args, fut))
        self._wake.set()
        if self._dead_error is not None or self._stopping:  # the loop died while we queued: never hang
            self._fail_commands(self._dead_error or EngineDeadError("the engine is shutting down"))
        return fut

    async def _add(self, request_id: str, prompt: Any, params: Optional[SamplingParams], priority: int,
                   arrival_time: Optional[float]) -> _Stream:
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, loop, asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use.")
            self._streams[request_id] = stream
        arrival_time = arrival_time if arrival_time is not None else time.time()
        deadline = None
        if self.request_timeout is not None:
            deadline = (request_started_at.get() or arrival_time) + self.request_timeout
            if time.time() >= deadline:  # spent before it reached the engine (a long grammar compile)
                with self._lock:
                    self._streams.pop(request_id, None)
                stream.finished = True
                raise RequestTimeoutError(request_id, self.request_timeout)
        fut = self._submit("add", (request_id, prompt, params, arrival_time, priority))
        try:
            await asyncio.shield(asyncio.wrap_future(fut))
        except asyncio.CancelledError:
            # The add may still go through on the loop thread: make sure it is undone.
            stream.finished = True
            self._abort_nowait(request_id)
            raise
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            stream.finished = True
            raise
        if deadline is not None:
            stream.deadline_timer = loop.call_later(max(0.0, deadline - time.time()), self._expire, stream,
                                                    self.request_timeout)
        return stream

    def _expire(self, stream: _Stream, timeout: float) -> None:
        """The request's deadline passed (on its event loop): abort it, then wake its reader with the error."""
        if stream.finished:
            return
        logger.warning("request %s exceeded the request timeout (%g s): aborted", stream.request_id, timeout)
        self._abort_nowait(stream.request_id)
        stream.queue.put_nowait(RequestTimeoutError(stream.request_id, timeout))

    def _abort_nowait(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.finished = True
        if self._dead_error is None and not self._stopping:
            self._commands.append(_Command("abort", (request_id,)))
            self._wake.set()

    # ---- the loop thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping and self._dead_error is None:
                self._wake.clear()
                self._apply_commands()
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._dispatch(outputs)
                    self.last_stats = self.engine.get_stats()
                else:
                    self.last_stats = self.engine.get_stats()
                    self._wake.wait()
        except BaseException as e:  # noqa: BLE001 - any crash must fail the requests, never hang them
            logger.exception("engine loop crashed; failing all in-flight requests")
            self._die(e)
            return
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _apply_commands(self) -> None:
        while self._commands:
            cmd = self._commands.popleft()
            try:
                if cmd.kind == "add":
                    rid = cmd.args[0]
                    with self._lock:
                        wanted = rid in self._streams and not self._streams[rid].finished
                    if not wanted:  # cancelled before it reached the engine
                        result = None
                    else:
                        result = self.engine.add_request(rid, cmd.args[1], cmd.args[2], arrival_time=cmd.args[3],
                                                         priority=cmd.args[4])
                        self._live.add(rid)
                elif cmd.kind == "abort":
                    rid = cmd.args[0]
                    result = self.engine.abort_request(rid)
                    if rid in self._live:
                        self._live.discard(rid)
                        if self.stat_logger is not None:
                            self.stat_logger.on_abort(rid, time.time())
                elif cmd.kind == "stats":
                    result = self.engine.get_stats()
                elif cmd.kind == "snapshot":
                    result = self.engine.snapshot()
                else:  # pragma: no cover
                    raise AssertionError(cmd.kind)
            except (ValueError, QueueFullError) as e:  # the caller's fault (or a full queue): not a crash
                if cmd.future is not None:
                    cmd.future.set_exception(e)
                continue
            except Exception as e:  # noqa: BLE001
                if cmd.kind == "snapshot":  # a read for the dashboard: its failure is the reader's, not the engine's
                    logger.exception("engine snapshot failed")
                    if cmd.future is not None:
                        cmd.future.set_exception(e)
                    continue
                if cmd.kind != "add":
                    raise  # an abort or a stats read that fails means broken shared state
                # Engine.add_request undoes a request it could not accept: only this caller fails.
                logger.exception("request %s could not be added", cmd.args[0])
                if cmd.future is not None:
                    cmd.future.set_exception(RequestFailedError(f"the request could not be added: {e!r}"))
                continue
            if cmd.future is not None:
                cmd.future.set_result(result)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        if self.stat_logger is not None:
            self.stat_logger.on_outputs(outputs, now)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = {}
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                    stream.finished = True
                item = out if out.error is None else RequestFailedError(f"request failed: {out.error}")
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            self._post(loop, items)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[_Stream, Any]]) -> None:
        def deliver() -> None:
            for stream, item in items:
                stream.queue.put_nowait(item)

        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # that event loop is closed: nobody is listening
            pass

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = {}
        for s in streams:
            s.finished = True
            by_loop.setdefault(s.loop, []).append((s, error))
        for loop, items in by_loop.items():
            self._post(loop, items)
        self._fail_commands(error)

    def _fail_commands(self, error: BaseException) -> None:
        while self._commands:
            try:
                cmd = self._commands.popleft()
            except IndexError:  # another thread drained it first
                return
            if cmd.future is not None:
                try:
                    cmd.future.set_exception(error)
                except concurrent.futures.InvalidStateError:
                    pass

    def _on_executor_failure(self, error: BaseException) -> None:
        """From the executor's monitor thread: a worker rank is gone."""
        self._die(error)
        self._wake.set()  # an idle loop wakes up and ends

    def _die(self, cause: BaseException) -> None:
        err = EngineDeadError(f"the engine loop crashed: {cause!r}")
        err.__cause__ = cause
        with self._die_lock:  # the loop and the executor's monitor may both report one failure
            if self._dead_error is not None:
                return
            self._dead_error = err
        for fn in list(self._dead_callbacks):
            try:
                fn(err)
            except Exception:  # noqa: BLE001
                logger.exception("dead callback failed")
        self._fail_all(err)


class RequestStream:
    """The async iterator of one request's cumulative outputs (``AsyncEngine.add_request``).

    Outputs that piled up while the consumer was busy are merged: being cumulative, only the newest
    matters. ``close()`` (or a cancelled ``__anext__``) aborts the request if it has not finished.
    """

    def __init__(self, engine: AsyncEngine, stream: _Stream) -> None:
        self._engine = engine
        self._stream = stream
        self._done = False

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        queue = self._stream.queue
        try:
            item = await queue.get()
        except BaseException:  # cancelled: the consumer is gone
            self.close()
            raise
        while not queue.empty() and isinstance(item, RequestOutput):
            item = queue.get_nowait()
        if item is None:  # aborted through AsyncEngine.abort
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self.close()
        return item

    def close(self) -> None:
        """Aborts the request unless it finished (frees its KV blocks at once)."""
        self._done = True
        if self._stream.deadline_timer is not None:
            self._stream.deadline_timer.cancel()
        if not self._stream.finished:
            self._engine._abort_nowait(self._stream.request_id)

    async def aclose(self) -> None:
        self.close()
