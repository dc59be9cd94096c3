"""Replica processes behind the router: `vllm-engine serve --data-parallel-size 2` (one replica killed
mid-run loses no request that had not started streaming) and `vllm-engine router --config FILE --serve
ARGS --backend URL` (three models on one endpoint)."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from vllm_engine.serving.launcher import load_config, strip_flags

from .conftest import ENGINE_FLAGS, REPO, free_port, server_process, wait_healthy

pytestmark = pytest.mark.slow


def _replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/router/replicas").json()["replicas"]


def _request(url: str, i: int) -> tuple[int, str]:
    """A non-streaming (even i) or streaming (odd i) completion: (status, how it ended)."""
    body = {"model": "tiny", "prompt": f"Request {i} asks", "max_tokens": 48, "ignore_eos": True,
            "stream": i % 2 == 1}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    if not body["stream"]:
        return r.status_code, "complete" if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 48 else r.text
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    if "error" in last:
        return r.status_code, last["error"]["code"]
    return r.status_code, "complete"


def test_data_parallel_replicas_survive_a_killed_replica(tiny_dir, tmp_path):
    args = [str(tiny_dir), *ENGINE_FLAGS, "--served-model-name", "tiny", "--data-parallel-size", "2"]
    with server_process(args, tmp_path / "dp.log") as (url, _):
        replicas = _replicas(url)
        assert len(replicas) == 2 and all(r["healthy"] and r["pid"] for r in replicas)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny"]
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(_request, url, i) for i in range(12)]
            deadline = time.time() + 60
            while _replicas(url)[0]["in_flight"] < 2 and time.time() < deadline:
                time.sleep(0.01)
            os.kill(replicas[0]["pid"], signal.SIGKILL)
            results = [f.result() for f in futures]
        assert all(status == 200 for status, _ in results), results
        assert all(end == "complete" for i, (_, end) in enumerate(results) if i % 2 == 0), results  # none lost
        assert all(end in ("complete", "replica_failed") for _, end in results), results
        after = _replicas(url)
        assert after[0]["healthy"] is False and after[0]["failed_attempts"] + after[0]["stream_failures"] >= 2
        assert after[1]["in_flight"] == 0 and after[1]["outstanding_tokens"] == 0
        ok = client.completions.create(model="tiny", prompt="Still there?", max_tokens=3)
        assert ok.usage.completion_tokens == 3


def test_three_models_on_one_endpoint_from_a_config_file_serve_and_backend(tiny_dir, server, tmp_path):
    """`vllm-engine router --config FILE --serve ARGS --backend URL`: a model from the file, one from
    --serve (both launched by the router) and a running server; the router stops only its own."""
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  - args: [{tiny_dir}, {', '.join(ENGINE_FLAGS)}, --served-model-name, tiny-a]\n")
    serve = f"{tiny_dir} {' '.join(ENGINE_FLAGS)} --served-model-name tiny-b"
    port = free_port()
    import subprocess
    import sys

    log = open(tmp_path / "router.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_engine.cli", "router", "--config", str(config),
                             "--serve", serve, "--backend", server, "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert sorted(m.id for m in client.models.list()) == ["tiny", "tiny-a", "tiny-b"]
        by_model = {}
        for model in ("tiny-a", "tiny-b", "tiny", "tiny-a"):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                           json={"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                 "max_completion_tokens": 3})
            assert r.status_code == 200 and r.json()["model"] == model
            by_model.setdefault(model, set()).add(r.headers["x-vllm-engine-replica"])
        assert len(by_model["tiny-a"]) == 1 and len({*by_model["tiny-a"], *by_model["tiny-b"], *by_model["tiny"]}) == 3
        replicas = {r["url"]: r["pid"] for r in _replicas(url)}
        assert replicas[server] is None and all(pid for u, pid in replicas.items() if u != server)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    time.sleep(1)
    for u, pid in replicas.items():  # the router stopped the replicas it launched, not the backend
        if u != server:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_config_files_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - model: x\n")
    with pytest.raises(ValueError, match="models\\[0\\] needs `args`"):
        load_config(str(bad))
    bad.write_text("models:\n  - args: x\n    data_parallel_size: 0\n")
    with pytest.raises(ValueError, match="data_parallel_size"):
        load_config(str(bad))
    bad.write_text("mdels: []\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(str(bad))


def test_replica_command_lines_drop_the_routers_flags():
    flags = {"--data-parallel-size", "-dp", "--host", "--port"}
    argv = ["m", "--port", "9", "--data-parallel-size=2", "--host", "0.0.0.0", "--max-model-len", "256"]
    assert strip_flags(argv, flags) == ["m", "--max-model-len", "256"]
    assert strip_flags(["m", "-dp", "2", "-tp", "2"], flags) == ["m", "-tp", "2"]


def test_each_replica_gets_its_own_gpus(monkeypatch):
    import torch

    from vllm_engine.serving.launcher import device_slices, world_size

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_slices([world_size(["m"]), world_size(["m", "-tp", "2"])]) == ["0", "1,2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert device_slices([1, 2]) == ["4", "5,6"]
    with pytest.raises(ValueError, match="need 4 GPUs"):
        device_slices([2, 2])
