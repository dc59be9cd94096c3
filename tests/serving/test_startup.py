"""The server listens while its engine starts: 503 with code "starting" (and Retry-After) until the
engine is built, then the real API; a build that fails answers "startup_failed", tells the dead
callbacks (the server stops) and `serve` exits non-zero with the error."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import httpx
import pytest
from fastapi import FastAPI

from serving.conftest import free_port
from vllm_engine.serving.startup import StartingApp


class FakeAsyncEngine:
    def __init__(self) -> None:
        self.callbacks, self.dead_error, self.stopped = [], None, False

    def add_dead_callback(self, fn) -> None:
        self.callbacks.append(fn)

    def shutdown(self) -> None:
        self.stopped = True


def _real_app() -> FastAPI:
    app = FastAPI()
    app.state.async_engine = FakeAsyncEngine()

    @app.get("/health")
    async def health() -> dict:
        return {}

    return app


async def _get(app, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.get(path)


def test_503_while_starting_then_the_real_app():
    release, built = threading.Event(), _real_app()
    starting = StartingApp(lambda: (release.wait(10), built)[1])
    dead = []
    starting.add_dead_callback(dead.append)
    starting.start()
    for path in ("/health", "/v1/models"):
        r = asyncio.run(_get(starting, path))
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "starting"
    release.set()
    starting._thread.join(10)
    assert asyncio.run(_get(starting, "/health")).status_code == 200
    assert asyncio.run(_get(starting, "/v1/models")).status_code == 404  # the real app's own answer
    assert built.state.async_engine.callbacks == [dead.append] and not dead and not starting.failed


def test_a_failed_build_answers_startup_failed_and_tells_the_callbacks():
    def build():
        raise ValueError("the KV cache does not fit")

    starting = StartingApp(build)
    dead = []
    starting.add_dead_callback(dead.append)
    starting.start()
    starting._thread.join(10)
    r = asyncio.run(_get(starting, "/health"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "startup_failed"
    assert "the KV cache does not fit" in r.json()["error"]["message"]
    assert len(dead) == 1 and isinstance(dead[0], ValueError) and starting.failed
    late = []
    starting.add_dead_callback(late.append)  # registered after the failure: told at once
    assert late == dead


def test_serve_exits_with_the_error_when_the_engine_cannot_start(tiny_model_dir):
    """A setting only the built engine can refuse (room for no KV block): the server was listening,
    then stops by itself with exit status 2 and the reason."""
    proc = subprocess.run([sys.executable, "-m", "vllm_engine.cli", "serve", str(tiny_model_dir("llama")),
                           "--port", str(free_port()), "--cpu-kv-cache-space", "0.0000001", "--log-level", "warning"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error:" in proc.stderr and "KV cache" in proc.stderr
