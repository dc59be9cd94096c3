"""Fixtures for the server tests: a real `vllm-engine serve` process on the tiny random Llama, the
offline engine on the same checkpoint (the reference for greedy outputs), and in-thread servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
# Small, fixed KV cache (the CPU default is GiBs): 512 blocks x 16 tokens.
ENGINE_FLAGS = ["--max-model-len", "256", "--num-gpu-blocks-override", "512", "--seed", "0", "--dtype", "float32"]
ENGINE_KWARGS = dict(max_model_len=256, num_gpu_blocks_override=512, seed=0, dtype="float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_read_log(proc)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} did not become healthy")


def _read_log(proc: subprocess.Popen) -> str:
    path = getattr(proc, "log_path", None)
    return Path(path).read_text()[-5000:] if path else ""


@contextmanager
def server_process(args: list[str], log_path: Path, env: dict | None = None, timeout: float = 180.0
                   ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m vllm_engine.cli serve ARGS --port P` on 127.0.0.1; yields (base url, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm_engine.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def tiny_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def server(tiny_dir, tmp_path_factory) -> Iterator[str]:
    """Base URL of a real server process serving the tiny Llama (shared by the tests of the session)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with server_process([str(tiny_dir), *ENGINE_FLAGS, "--served-model-name", "tiny"], log) as (url, _):
        yield url


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def offline(tiny_dir):
    """The offline engine on the same checkpoint: the reference for greedy outputs."""
    from vllm_engine import Engine

    return Engine(model=str(tiny_dir), **ENGINE_KWARGS)


class ThreadServer:
    """An in-process uvicorn server (for configurations the shared server does not have)."""

    def __init__(self, app: Any) -> None:
        from vllm_engine.serving.cli_serve import build_server

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = build_server(app, "127.0.0.1", self.port, log_level="warning")
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.server.run()
        self.exit_code = 1 if self.app.state.async_engine.dead_error is not None else 0

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        wait_healthy(self.url, timeout=30)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.app.state.async_engine.shutdown()


def parse_metrics(text: str, model: str = "tiny") -> dict[str, float]:
    """Prometheus text -> {sample name with labels: value} (label model_name dropped for brevity)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k != "model_name"}
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
            if s.labels.get("model_name", model) == model:
                out[key] = s.value
    return out
