"""Serving while the engine starts: the server listens at once and answers 503 until the model is up.

Loading weights, sizing the KV cache and capturing CUDA graphs take from seconds to minutes. A
supervisor (Kubernetes, the router, a shell loop) must tell "starting" from "dead", so ``serve``
does not build the engine first and listen afterwards: uvicorn serves a ``StartingApp`` from the
start, which answers every request with 503 (code ``starting``, ``Retry-After``) while a background
thread builds the engine and its FastAPI app, and hands every request to that app once it exists.
If the build fails, the error is logged, requests get 503 with code ``startup_failed``, and the
server stops with a non-zero exit status.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)


class StartingApp:
    """An ASGI app: 503 until ``build()`` (run on a thread by ``start()``) returns the real app,
    then that app. ``add_dead_callback(fn)``: ``fn(error)`` when the build fails or, later, when
    the built app's engine dies."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build_fn = build
        self.app: Optional[Any] = None
        self.error: Optional[BaseException] = None
        self._callbacks: list[Callable[[BaseException], None]] = []
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._build, name="engine-startup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add_dead_callback(self, fn: Callable[[BaseException], None]) -> None:
        with self._lock:
            self._callbacks.append(fn)
            app, error = self.app, self.error
        if error is not None:
            fn(error)
        elif app is not None:
            app.state.async_engine.add_dead_callback(fn)

    @property
    def failed(self) -> bool:
        """The build failed, or the built app's engine died."""
        if self.error is not None:
            return True
        return self.app is not None and self.app.state.async_engine.dead_error is not None

    def _build(self) -> None:
        try:
            app = self._build_fn()
        except BaseException as e:  # noqa: BLE001 - reported to the callbacks (the server exits non-zero)
            if isinstance(e, ValueError):  # a configuration the engine refuses: the message says why
                logger.error("the engine cannot start: %s", e)
            else:
                logger.exception("the engine failed to start")
            with self._lock:
                self.error = e
                callbacks = list(self._callbacks)
            for fn in callbacks:
                fn(e)
            return
        with self._lock:
            self.app = app
            callbacks = list(self._callbacks)
        for fn in callbacks:
            app.state.async_engine.add_dead_callback(fn)
        logger.info("the engine is ready after %.1f s: serving requests", time.monotonic() - self._t0)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = self.app
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket: refuse it
            await send({"type": "websocket.close", "code": 1013})
            return
        await self._unavailable(send)

    async def _unavailable(self, send: Callable) -> None:
        if self.error is not None:
            message, code = f"the engine failed to start: {self.error}", "startup_failed"
        else:
            message = f"the engine is starting (loading the model, {time.monotonic() - self._t0:.0f} s so far)"
            code = "starting"
        body = json.dumps({"error": {"message": message, "type": "ServiceUnavailable", "param": None,
                                     "code": code}}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        """Start-up completes at once (the engine builds on its thread); shutdown stops the engine
        if it was built (the app owns it)."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.app is not None:
                    self.app.state.async_engine.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
