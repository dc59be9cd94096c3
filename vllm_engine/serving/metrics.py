"""Prometheus metrics (``GET /metrics``) with vLLM's meanings, a ``vllm_engine:`` prefix and a model_name label.

Two sources:
- engine state (running / waiting requests, KV cache usage and free blocks, token, preemption and
  prefix-cache counters) is read from the AsyncEngine's latest ``EngineStats`` at scrape time by a
  custom collector, so gauges are never stale and counters mirror the engine's own totals;
- per-request histograms (TTFT, inter-token latency, end-to-end latency, queue time, prompt and
  generation lengths) and finished-request counts are observed by ``ServerMetrics`` as a StatLogger
  on the engine loop thread, which sees every step's outputs. It also writes the one log line per
  finished request.

GPU memory and utilisation gauges come from ``gpu_metrics.GPUCollector`` (NVML when installed).

Each ServerMetrics has its own CollectorRegistry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vllm_engine.outputs import RequestOutput
from vllm_engine.serving.gpu_metrics import GPUCollector

logger = logging.getLogger("vllm_engine.serving.requests")

P = "vllm_engine:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineStatsCollector:
    """Reads the engine's latest stats at scrape time (gauges and engine-side counters)."""

    def __init__(self, model_name: str, get_stats: Callable[[], Any]) -> None:
        self.model_name = model_name
        self.get_stats = get_stats

    def collect(self) -> Iterable[Any]:
        s = self.get_stats()
        if s is None:
            return
        labels, value = ["model_name"], [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(P + name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(P + name, doc, labels=labels)  # exposed as <name>_total
            c.add_metric(value, v)
            return c

        yield gauge("num_requests_running", "Number of requests in model execution batches.", s.num_running)
        yield gauge("num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting)
        yield gauge("num_requests_swapped", "Number of requests swapped to CPU.", s.num_swapped)
        yield gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
        yield gauge("kv_cache_free_blocks", "Number of free KV-cache blocks.", s.num_free_blocks)
        yield gauge("kv_cache_total_blocks", "Number of KV-cache blocks in total.", s.num_total_blocks)
        yield counter("prompt_tokens", "Number of prefill tokens processed.", s.num_prompt_tokens_total)
        yield counter("generation_tokens", "Number of generation tokens processed.", s.num_generation_tokens_total)
        yield counter("num_preemptions", "Cumulative number of preemptions from the engine.", s.num_preemptions_total)
        yield counter("num_swaps", "Cumulative number of swap-outs of preempted requests.", s.num_swaps_total)
        yield counter("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      s.prefix_cache_hits)
        spec = getattr(s, "spec_decode", None)
        if spec is not None:
            yield from _spec_decode_metrics(spec, labels, value)


def _spec_decode_metrics(spec: Any, labels: list[str], value: list[str]) -> Iterable[Any]:
    """vLLM's speculative-decoding counters (a draft: one request's proposal in one step), and
    the acceptance rate and mean acceptance length they give (gauges, since the server started)."""
    for name, doc, v in (
        ("spec_decode_num_drafts", "Number of spec decoding drafts.", spec.num_drafts),
        ("spec_decode_num_draft_tokens", "Number of draft tokens.", spec.num_draft_tokens),
        ("spec_decode_num_accepted_tokens", "Number of accepted tokens.", spec.num_accepted_tokens),
    ):
        c = CounterMetricFamily(P + name, doc, labels=labels)
        c.add_metric(value, v)
        yield c
    per_pos = CounterMetricFamily(P + "spec_decode_num_accepted_tokens_per_pos",
                                  "Accepted tokens per draft position.", labels=labels + ["position"])
    for pos, v in enumerate(spec.accepted_per_position):
        per_pos.add_metric(value + [str(pos)], v)
    yield per_pos
    for name, doc, v in (
        ("spec_decode_acceptance_rate", "Accepted / draft tokens since start.", spec.acceptance_rate),
        ("spec_decode_mean_acceptance_length", "Tokens per verifying step of a speculating request "
                                               "(1 + accepted / drafts) since start.", spec.mean_acceptance_length),
    ):
        g = GaugeMetricFamily(P + name, doc, labels=labels)
        g.add_metric(value, v)
        yield g


@dataclass
class _Tracked:
    """Per-request timing state kept between steps (loop thread only)."""

    arrival_time: float
    last_token_time: Optional[float] = None
    num_tokens: int = 0


class ServerMetrics:
    """The server's Prometheus registry, and the AsyncEngine StatLogger that feeds its histograms."""

    def __init__(self, model_name: str, get_stats: Callable[[], Any]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineStatsCollector(model_name, get_stats))
        self.registry.register(GPUCollector(model_name))
        r, lab = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(P + name, doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.request_success = Counter(P + "request_success", "Count of finished requests, by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = hist("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        _LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Histogram of end-to-end request latency in seconds.",
                        _LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Histogram of time spent waiting in the queue.",
                               _LATENCY_BUCKETS)
        self.prompt_len = hist("request_prompt_tokens", "Number of prefill tokens processed, per request.",
                               _LENGTH_BUCKETS)
        self.gen_len = hist("request_generation_tokens", "Number of generation tokens processed, per request.",
                            _LENGTH_BUCKETS)
        self._tracked: dict[str, _Tracked] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- StatLogger (called on the engine loop thread) -----------------------------------------------
    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            arrival = out.metrics.arrival_time if out.metrics else now
            t = self._tracked.get(out.request_id)
            if t is None:
                t = self._tracked[out.request_id] = _Tracked(arrival)
            num_tokens = sum(len(c.token_ids) for c in out.outputs)
            if num_tokens > t.num_tokens:
                if t.last_token_time is None:
                    self.ttft.observe(max(0.0, now - t.arrival_time))
                else:
                    # One interval per step; a step that produced k tokens (n > 1 samples) counts k times.
                    gap = now - t.last_token_time
                    for _ in range(num_tokens - t.num_tokens):
                        self.itl.observe(gap)
                t.last_token_time, t.num_tokens = now, num_tokens
            if out.finished:
                self._tracked.pop(out.request_id, None)
                self._finished(out, now)

    def on_abort(self, request_id: str, now: float) -> None:
        t = self._tracked.pop(request_id, None)
        self.request_success.labels(self.model_name, "abort").inc()
        total = now - t.arrival_time if t else 0.0
        logger.info("request %s aborted: output %d tokens, total %.3fs", request_id, t.num_tokens if t else 0, total)

    def _finished(self, out: RequestOutput, now: float) -> None:
        m = out.metrics
        arrival = m.arrival_time if m else now
        num_out = sum(len(c.token_ids) for c in out.outputs)
        reason = out.outputs[0].finish_reason if out.outputs else None
        self.request_success.labels(self.model_name, reason or "unknown").inc()
        self.e2e.observe(max(0.0, now - arrival))
        if m is not None and m.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, m.first_scheduled_time - arrival))
        self.prompt_len.observe(len(out.prompt_token_ids))
        self.gen_len.observe(num_out)
        ttft = (m.first_token_time - arrival) if m and m.first_token_time else float("nan")
        logger.info("request %s finished: prompt %d tokens, output %d tokens, TTFT %.3fs, total %.3fs, finish %s",
                    out.request_id, len(out.prompt_token_ids), num_out, ttft, now - arrival,
                    ",".join(str(c.finish_reason) for c in out.outputs))
