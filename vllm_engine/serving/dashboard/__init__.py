"""``GET /dashboard``: a live page of the engine (plain HTML + JS in dashboard.html, no build step), and
``GET /dashboard/events``: its feed, server-sent events of ``DashboardFeed.frame()``.

A frame is ``Engine.snapshot()`` (queues, each request's progress and block table, the KV block map
as one character per block: ``.`` free, ``c`` cached, ``u`` in use, ``s`` shared), taken on the
engine loop thread between steps, plus the time and the server's latency histogram sums and counts
(the page turns deltas into throughput and mean TTFT / inter-token latency per interval). Frames are
shared: however many pages are open, the engine is asked at most once per ``interval``.

Both routes are open like /metrics (no API key: a browser's EventSource cannot send one); a frame
holds request ids and token counts, never prompt or output text.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

DASHBOARD_PATHS = ("/dashboard", "/dashboard/events")
PAGE = Path(__file__).with_name("dashboard.html")
HISTOGRAMS = {"ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds",
              "e2e": "e2e_request_latency_seconds", "queue": "request_queue_time_seconds"}


class DashboardFeed:
    """Builds frames for the page; one engine snapshot per ``interval`` at most, shared by every reader."""

    def __init__(self, async_engine: Any, metrics: Any, interval: float = 0.5) -> None:
        self.async_engine, self.metrics, self.interval = async_engine, metrics, interval
        self._last: Optional[dict] = None
        self._lock = asyncio.Lock()

    async def frame(self) -> dict:
        async with self._lock:
            if self._last is None or time.time() - self._last["time"] >= self.interval * 0.9:
                snap = await self.async_engine.snapshot()
                self._last = {"time": time.time(), **snap, "latency": self._latency_sums()}
            return self._last

    def _latency_sums(self) -> dict:
        """{name: [sum of seconds, count]} of the server's latency histograms (cumulative)."""
        registry, labels = self.metrics.registry, {"model_name": self.metrics.model_name}
        out = {}
        for key, name in HISTOGRAMS.items():
            total = registry.get_sample_value(f"vllm_engine:{name}_sum", labels) or 0.0
            count = registry.get_sample_value(f"vllm_engine:{name}_count", labels) or 0.0
            out[key] = [total, count]
        return out

    async def events(self, request: Request) -> AsyncIterator[str]:
        """A frame every ``interval`` until the client leaves; a dead engine ends the stream with an error event."""
        while not await request.is_disconnected():
            try:
                frame = await self.frame()
            except Exception as e:  # noqa: BLE001 - the engine died or is stopping: tell the page, then stop
                yield f"event: error\ndata: {json.dumps({'message': str(e)})}\n\n"
                return
            yield f"data: {json.dumps(frame)}\n\n"
            await asyncio.sleep(self.interval)


def add_dashboard(app: FastAPI, async_engine: Any, metrics: Any, interval: float = 0.5) -> DashboardFeed:
    """Adds GET /dashboard and GET /dashboard/events to ``app`` (left out of the OpenAPI document)."""
    feed = DashboardFeed(async_engine, metrics, interval)
    page = PAGE.read_text()

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/dashboard/events", include_in_schema=False)
    async def dashboard_events(request: Request) -> StreamingResponse:
        return StreamingResponse(feed.events(request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return feed
