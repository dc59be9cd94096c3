"""/dashboard: the feed (server-sent frames of Engine.snapshot) read with httpx while requests run, and
the page itself in headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

`VLLM_ENGINE_DASHBOARD_SCREENSHOT=docs/dashboard.png` writes the browser test's screenshot there.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from vllm_engine import Engine
from vllm_engine.engine.async_engine import AsyncEngine
from vllm_engine.serving.api_server import create_app

from .conftest import ENGINE_KWARGS, ThreadServer

SHARED_PREFIX = "Tell me everything about paged attention and continuous batching, please: " * 2


@pytest.fixture(scope="module")
def server(tiny_dir) -> Iterator[ThreadServer]:
    """A server whose steps are slowed down (20 ms each), so that requests stay in flight a while."""
    engine = Engine(model=str(tiny_dir), served_model_name="tiny", **{**ENGINE_KWARGS, "num_gpu_blocks_override": 96})
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    engine.step = slow_step  # type: ignore[method-assign]
    with ThreadServer(create_app(AsyncEngine(engine), api_key="sk-test")) as srv:
        yield srv


def _run_requests(url: str, n: int, max_tokens: int) -> threading.Thread:
    """n completions sharing a prompt prefix, in the background."""
    def one(i: int) -> None:
        r = httpx.post(f"{url}/v1/completions", timeout=120, headers={"Authorization": "Bearer sk-test"},
                       json={"prompt": SHARED_PREFIX + f"Part {i}.", "max_tokens": max_tokens, "ignore_eos": True})
        assert r.status_code == 200, r.text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    waiter = threading.Thread(target=lambda: [t.join() for t in threads])
    waiter.start()
    return waiter


def _frames(url: str) -> Iterator[dict]:
    with httpx.stream("GET", f"{url}/dashboard/events", timeout=30) as r:  # no API key: the dashboard is open
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                yield json.loads(line[6:])


def test_the_page_is_served_without_an_api_key(server):
    r = httpx.get(f"{server.url}/dashboard")
    assert r.status_code == 200 and "EventSource" in r.text and r.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the API itself still needs the key
    assert "/dashboard" not in httpx.get(f"{server.url}/openapi.json",
                                         headers={"Authorization": "Bearer sk-test"}).json()["paths"]


def test_the_feed_shows_requests_their_blocks_and_shared_prefix_blocks(server):
    waiter = _run_requests(server.url, 4, 100)
    busy, idle = None, None
    deadline = time.time() + 60
    for frame in _frames(server.url):
        assert time.time() < deadline, "no frame showed the requests running"
        running = [r for r in frame["requests"] if r["queue"] == "running" and r["output_tokens"] > 0]
        if busy is None and len(running) >= 2 and "s" in frame["blocks"]:
            busy = frame
        if busy is not None and not waiter.is_alive() and not frame["requests"]:
            idle = frame
            break
    waiter.join()
    assert len(busy["blocks"]) == busy["num_blocks"] == 96
    held: dict[int, list[str]] = {}
    for r in busy["requests"]:
        assert r["computed_tokens"] <= r["prompt_tokens"] + r["output_tokens"]
        if r["queue"] == "running":
            assert len(r["blocks"]) * busy["block_size"] >= r["computed_tokens"] > 0
        for b in r["blocks"]:
            held.setdefault(b, []).append(r["id"])
    for b, who in held.items():  # the map agrees with the tables: shared blocks are in several tables
        assert busy["blocks"][b] == ("s" if len(who) > 1 else "u"), (b, who)
    assert {i for i, c in enumerate(busy["blocks"]) if c in "us"} == set(held)
    assert idle["blocks"].count("u") + idle["blocks"].count("s") == 0 and "c" in idle["blocks"]  # cached prefix kept
    assert idle["num_generation_tokens_total"] >= busy["num_generation_tokens_total"] + 1
    assert idle["latency"]["ttft"][1] >= 4 and idle["latency"]["itl"][0] > 0


# ---- the page in headless Chromium ------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium here (Debian: apt-get install chromium): the page is tested through its feed only")


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in,
    fd 4 out, NUL-terminated JSON), so no websocket client or driver is needed."""

    def __init__(self, binary: str, profile: Path, width: int = 1400, height: int = 1200) -> None:
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def wire() -> None:  # in the child: our pipe ends become its fds 3 and 4 (dup2 clears CLOEXEC)
            os.dup2(to_chrome, 100)
            os.dup2(from_chrome, 101)
            os.dup2(100, 3)
            os.dup2(101, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "--hide-scrollbars", "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._id, self.session = b"", 0, None
        pages = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        self.session = self.call("Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            ready, _, _ = select.select([self._in], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise TimeoutError(f"Chromium did not answer {method}")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium exited")
            self._buf += chunk

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)


def test_the_page_updates_in_headless_chromium(server, tmp_path):
    browser = DevTools(_chromium(), tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{server.url}/dashboard")
        deadline = time.time() + 30
        while browser.evaluate("Number(document.body?.dataset.frames || 0)") < 2:  # connected, drawing frames
            assert time.time() < deadline, "the page drew no frame"
            time.sleep(0.1)
        assert browser.evaluate("document.getElementById('status').textContent") == "live"
        waiter = _run_requests(server.url, 6, 130)
        frames_before = browser.evaluate("Number(document.body?.dataset.frames || 0)")
        seen = None
        deadline = time.time() + 60
        while seen is None:
            assert time.time() < deadline, "the page never showed the requests running"
            state = browser.evaluate("""({rows: [...document.querySelectorAll('#requests tr')].map(
                tr => [...tr.children].map(td => td.textContent)),
                frames: Number(document.body.dataset.frames),
                tiles: document.getElementById('tiles').textContent})""")
            running = [row for row in state["rows"] if row[1] == "running" and int(row[5].split(" / ")[0]) > 0]
            if len(running) >= 3 and state["frames"] >= frames_before + 4:  # a few points on the charts
                seen = state
                shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
            time.sleep(0.1)
        frames_then = seen["frames"]
        assert "shared blocks" in seen["tiles"] and "generation tok/s" in seen["tiles"]
        waiter.join()
        deadline = time.time() + 30
        while browser.evaluate("document.querySelectorAll('#requests tr').length") > 0:
            assert time.time() < deadline, "finished requests stayed on the page"
            time.sleep(0.1)
        assert browser.evaluate("Number(document.body?.dataset.frames || 0)") > frames_then  # it kept updating
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
        out = os.environ.get("VLLM_ENGINE_DASHBOARD_SCREENSHOT")
        (Path(out) if out else tmp_path / "dashboard.png").write_bytes(shot)
    finally:
        browser.close()
