"""deploy/: the Grafana dashboard and the Prometheus rules use only metrics that a server's and a
router's /metrics really expose; and the GPU gauges (NVML through a stand-in pynvml module, none on a
host without GPUs)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from vllm_engine import Engine
from vllm_engine.engine.async_engine import AsyncEngine
from vllm_engine.serving.api_server import create_app
from vllm_engine.serving.router import create_router_app

from .conftest import ENGINE_KWARGS, REPO, ThreadServer
from .test_router import AppThread

DEPLOY = REPO / "deploy"
METRIC = re.compile(r"\b(vllm_engine(?:_router)?:[A-Za-z0-9_]+)")
PROMETHEUS_SERIES = {"up"}  # made by Prometheus itself for every target


def fake_pynvml(utilization: int = 37) -> types.ModuleType:
    """Just what GPUCollector calls: one device, 80 GiB, 30 GiB used."""
    m = types.ModuleType("pynvml")
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    m.nvmlDeviceGetHandleByUUID = lambda uuid: ("gpu", uuid)
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=30 << 30, total=80 << 30, free=50 << 30)
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=utilization, memory=10)
    return m


@pytest.fixture(scope="module")
def exposed(tiny_dir) -> Iterator[dict[str, str]]:
    """/metrics of a server (with NVML stood in) and of a router over it, after one request."""
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "pynvml", fake_pynvml())
    mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    engine = Engine(model=str(tiny_dir), served_model_name="tiny", **ENGINE_KWARGS)
    try:
        with ThreadServer(create_app(AsyncEngine(engine))) as srv, \
                AppThread(create_router_app([srv.url], health_interval=60)) as router:
            r = httpx.post(f"{router.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
            assert r.status_code == 200
            yield {"server": httpx.get(f"{srv.url}/metrics").text, "router": httpx.get(f"{router.url}/metrics").text}
    finally:
        mp.undo()


def _sample_names(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def _check_exprs(exprs: dict[str, str], names: set[str]) -> None:
    assert exprs
    for where, expr in exprs.items():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), where
        used = set(METRIC.findall(expr)) | (PROMETHEUS_SERIES & set(re.findall(r"\b[a-z_]+\b(?=\{)", expr)))
        assert used, f"{where}: no metric in {expr!r}"
        missing = used - names - PROMETHEUS_SERIES
        assert not missing, f"{where}: {sorted(missing)} not on /metrics"


def test_the_gpu_gauges_come_from_nvml(exposed):
    for text in exposed.values():
        samples = {(s.name, s.labels.get("gpu")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("vllm_engine:gpu_memory_used_bytes", "0")] == 30 << 30
        assert samples[("vllm_engine:gpu_memory_total_bytes", "0")] == 80 << 30
        assert samples[("vllm_engine:gpu_utilization_perc", "0")] == pytest.approx(0.37)


def test_no_gpu_gauges_without_a_gpu(monkeypatch):
    import torch

    from vllm_engine.serving.gpu_metrics import GPUCollector

    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("this process uses a GPU")
    assert list(GPUCollector("m").collect()) == []


def test_nvml_follows_cuda_visible_devices(monkeypatch):
    from vllm_engine.serving.gpu_metrics import GPUCollector

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-1234")
    assert [(gpu, h) for gpu, h in GPUCollector("m").handles] == [("0", ("gpu", 3)), ("1", ("gpu", "GPU-1234"))]


def test_alert_rules_use_exposed_metrics(exposed):
    names = _sample_names(exposed["server"]) | _sample_names(exposed["router"])
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"VllmEngineDown", "VllmEngineQueueGrowing", "VllmEngineKVCacheFull", "VllmEngineTTFTHigh"} <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info") and rule["annotations"]["summary"], name
    _check_exprs({name: r["expr"] for name, r in alerts.items()}, names)
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"] and config["scrape_configs"][0]["job_name"] == "vllm-engine"


def test_the_grafana_dashboard_uses_exposed_metrics(exposed):
    names = _sample_names(exposed["server"]) | _sample_names(exposed["router"])
    dash = json.loads((DEPLOY / "grafana" / "vllm-engine.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    exprs = {f"{p['title']} {t['refId']}": t["expr"] for p in panels for t in p["targets"]}
    exprs.update({f"variable {v['name']}": v["definition"] for v in dash["templating"]["list"] if "definition" in v})
    _check_exprs(exprs, names)
    titles = " ".join(p["title"] for p in panels)
    for needed in ("Time to first token", "KV cache usage", "GPU memory", "GPU utilisation", "Replica health"):
        assert needed in titles
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["gridPos"]["w"] > 0
    covered = set(METRIC.findall(" ".join(exprs.values())))
    families = {f.name for f in text_string_to_metric_families(exposed["server"] + exposed["router"])}
    exposed_families = {f for f in families if f.startswith("vllm_engine") and not f.endswith("_created")}
    assert exposed_families <= {re.sub(r"_(bucket|total|sum|count)$", "", m)
                                                                       for m in covered}  # every metric on a panel
