"""tests/benchmarks/serving_bench.py for a few seconds against a tiny model: one server, and the router
over two replicas."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import httpx
import pytest

from vllm_engine.serving.router import create_router_app

from .conftest import REPO, parse_metrics
from .test_router import AppThread, _replica

sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
import serving_bench  # noqa: E402


@pytest.fixture(scope="module")
def replicas(tiny_dir):
    with _replica(tiny_dir, "tiny") as a, _replica(tiny_dir, "tiny") as b:
        yield a, b


def _run(url: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "serving.json"
    code = serving_bench.main(["--base-url", url, "--num-prompts", "12", "--input-len", "24", "--output-len", "8",
                               "--vocab-size", "200", "--goodput", "ttft:60000", "tpot:60000", "--out", str(out),
                               *extra])
    assert code == 0
    return json.loads(out.read_text())


def _check_run(run: dict) -> None:
    assert run["completed"] == 12 and run["failed"] == 0
    assert run["output_tokens"] == 12 * 8  # ignore_eos: every request makes exactly its output length
    assert run["input_tokens"] == 12 * 24
    assert run["goodput"] == pytest.approx(run["request_throughput"])  # targets of a minute: every request meets them
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = run[metric]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"], (metric, s)
    assert run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"]
    assert run["output_throughput"] == pytest.approx(run["output_tokens"] / run["duration_s"])


def test_rate_and_concurrency_sweep_against_one_server(replicas, tmp_path):
    data = _run(replicas[0].url, tmp_path, "--request-rate", "40", "inf", "--max-concurrency", "0", "4",
                "--plot", str(tmp_path / "serving.png"))
    assert data["model"] == "tiny" and len(data["runs"]) == 4
    assert [(r["request_rate"], r["max_concurrency"]) for r in data["runs"]] == [
        (40.0, None), ("inf", None), (40.0, 4), ("inf", 4)]
    for run in data["runs"]:
        _check_run(run)
    assert (tmp_path / "serving.png").stat().st_size > 10_000
    assert data["sustained_request_rate"] == {"None": 40.0, "4": 40.0}  # targets of a minute: met at every rate


def test_through_the_router_with_two_replicas(replicas, tmp_path):
    with AppThread(create_router_app([r.url for r in replicas], health_interval=60)) as router:
        data = _run(router.url, tmp_path, "--dataset", "sharegpt-like", "--max-concurrency", "6",
                    "--input-len", "24", "--prefix-len", "0", "--warmup", "2")
        text = httpx.get(f"{router.url}/metrics").text
    (run,) = data["runs"]
    assert run["completed"] == 12 and run["failed"] == 0 and run["goodput"] == pytest.approx(run["request_throughput"])
    routed = {k: v for k, v in parse_metrics(text).items() if k.startswith("vllm_engine_router:routed_requests_total")}
    per_replica = {}
    for key, v in routed.items():
        replica = key.split("replica=")[1].rstrip("}")
        per_replica[replica] = per_replica.get(replica, 0) + v
    assert sum(per_replica.values()) == 2 + 12 and min(per_replica.values()) >= 3, per_replica  # warm-up + measured


def test_goodput_counts_only_requests_within_the_targets(replicas, tmp_path):
    out = tmp_path / "strict.json"
    assert serving_bench.main(["--base-url", replicas[0].url, "--num-prompts", "4", "--input-len", "8",
                               "--output-len", "4", "--vocab-size", "200", "--goodput", "ttft:0.001",
                               "--out", str(out)]) == 0
    strict = json.loads(out.read_text())
    assert strict["runs"][0]["goodput"] == 0.0 and strict["sustained_request_rate"] == {"None": None}
    with pytest.raises(ValueError, match="--goodput"):
        serving_bench.parse_goodput(["latency:5"])


def test_workloads_fit_the_context():
    reqs = serving_bench.make_requests("sharegpt-like", 200, 150, 200, 0.0, 16, 100, 256, seed=1)
    assert all(len(r.prompt) + r.output_len <= 256 and r.output_len >= 1 for r in reqs)
    assert len({tuple(r.prompt[:16]) for r in reqs}) == 1  # the shared prefix
    lens = [len(r.prompt) for r in serving_bench.make_requests("random", 50, 100, 10, 0.5, 0, 100, 4096, seed=1)]
    assert 50 <= min(lens) < max(lens) <= 150 and not math.isnan(sum(lens))


def test_a_model_without_a_tokenizer_is_timed_by_token_logprobs(tiny_dir, tmp_path):
    """Dummy-weight configs have no tokenizer, so no text streams: the bench asks for token logprobs."""
    import shutil

    from vllm_engine import Engine
    from vllm_engine.engine.async_engine import AsyncEngine
    from vllm_engine.serving.api_server import create_app

    from .conftest import ENGINE_KWARGS, ThreadServer

    bare = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    engine = Engine(model=str(bare), served_model_name="bare", **ENGINE_KWARGS)
    assert engine.tokenizer is None
    with ThreadServer(create_app(AsyncEngine(engine))) as srv:
        data = _run(srv.url, tmp_path, "--max-concurrency", "4")
    assert data["has_tokenizer"] is False
    _check_run(data["runs"][0])
