"""Serving benchmark: streams requests at a request rate (Poisson arrivals, or gamma with --burstiness) or
at a fixed concurrency against a running server or router, and reports TTFT, TPOT, inter-token
latency and end-to-end latency percentiles, throughput and goodput under latency targets.

    vllm-engine serve MODEL --port 8000 &
    python tests/benchmarks/serving_bench.py --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --dataset sharegpt-like --request-rate 1 2 4 8 inf --goodput ttft:200 tpot:30 \\
        --out results/serving.json --plot results/serving.png

Requests are /v1/completions with token-id prompts (exact input lengths for any model: ids drawn
below --vocab-size) and ``ignore_eos`` (exact output lengths), streamed with usage. A model without a
tokenizer (dummy weights of a bundled config) streams no text: the requests then ask for each token's
logprob (``logprobs: 0``), so that every step still sends a chunk (a little sampler work more). Per request:
TTFT = first content chunk - send time; TPOT = (end - first chunk) / (output tokens - 1); ITL = the
gaps between content chunks (a chunk can carry several tokens when the client lags); E2E = end - send.
Goodput: requests per second that met every --goodput target (a one-token output meets any TPOT target);
``sustained_request_rate``: the highest swept rate up to which every rate kept the p99 of each targeted
latency within its target. ``--warmup N`` requests go first, unmeasured (compilation, allocator, caches). Each sweep point (every request rate x
every max concurrency) runs the same workload. Datasets: ``random`` (lengths uniform in
[len * (1 - range_ratio), len * (1 + range_ratio)]) and ``sharegpt-like`` (log-normal lengths shaped
like ShareGPT conversations: median input ~ 150, output ~ 200 tokens, scaled by --input-len /
--output-len over those defaults, clipped to the context). ``--prefix-len N`` gives every prompt the
same first N tokens (prefix caching, router affinity).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx
import numpy as np


@dataclass
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class Result:
    ok: bool
    send_time: float
    ttft: float = math.nan
    e2e: float = math.nan
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else math.nan


def make_requests(dataset: str, num: int, input_len: int, output_len: int, range_ratio: float, prefix_len: int,
                  vocab_size: int, max_model_len: int, seed: int) -> list[Request]:
    """The workload (module docstring); every request fits in ``max_model_len``."""
    rng = np.random.default_rng(seed)
    if dataset == "random":
        ins = rng.integers(int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio)) + 1, num)
        outs = rng.integers(int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio)) + 1, num)
    elif dataset == "sharegpt-like":
        ins = rng.lognormal(math.log(150), 0.9, num) * input_len / 150
        outs = rng.lognormal(math.log(200), 0.8, num) * output_len / 200
    else:
        raise ValueError(f"unknown dataset {dataset!r}: random or sharegpt-like")
    prefix = rng.integers(0, vocab_size, prefix_len).tolist()
    out = []
    for i, o in zip(ins, outs):
        n_out = int(np.clip(o, 1, max_model_len - prefix_len - 2))
        n_in = int(np.clip(i, 1, max_model_len - prefix_len - n_out))
        out.append(Request(prefix + rng.integers(0, vocab_size, n_in).tolist(), n_out))
    return out


async def send(client: httpx.AsyncClient, url: str, model: str, req: Request, headers: dict,
               token_logprobs: bool = False) -> Result:
    """One streamed completion, timed. ``token_logprobs``: ask for each token's logprob, so that a model
    without a tokenizer (no text to stream) still sends a chunk per step."""
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if token_logprobs:
        body["logprobs"] = 0
    res = Result(ok=False, send_time=time.perf_counter())
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                now = time.perf_counter()
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                if choice.get("text") or (choice.get("logprobs") or {}).get("tokens"):
                    if last is None:
                        res.ttft = now - res.send_time
                    else:
                        res.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        res.error = repr(e)
        return res
    res.e2e = time.perf_counter() - res.send_time
    res.ok = last is not None and res.output_tokens > 0
    if not res.ok:
        res.error = res.error or "no tokens"
    return res


async def run_point(url: str, model: str, requests: list[Request], rate: float, concurrency: Optional[int],
                    burstiness: float, seed: int, headers: dict, token_logprobs: bool = False
                    ) -> tuple[list[Result], float]:
    """Sends the workload at ``rate`` requests/s (inf: all at once) under ``concurrency``; (results, seconds)."""
    rng = np.random.default_rng(seed)
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits) as client:
        async def one(req: Request) -> Result:
            if gate is None:
                return await send(client, url, model, req, headers, token_logprobs)
            async with gate:
                return await send(client, url, model, req, headers, token_logprobs)

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def stats_ms(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64) * 1e3
    if not v.size:
        return {k: math.nan for k in ("mean", "p50", "p90", "p99")}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99))}


def meets(r: Result, key: str, target_ms: float) -> bool:
    """Whether ``r`` met a latency target; a one-token output has no TPOT and meets any TPOT target."""
    if key == "tpot" and r.output_tokens <= 1:
        return True
    return getattr(r, key) * 1e3 <= target_ms


def summarize(results: list[Result], seconds: float, requests: list[Request], slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if all(meets(r, k, v) for k, v in slo.items())]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(len(q.prompt) for q, r in zip(requests, results) if r.ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5], "duration_s": seconds,
        "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / seconds, "output_throughput": out_tokens / seconds,
        "total_token_throughput": (in_tokens + out_tokens) / seconds,
        "goodput": len(good) / seconds if slo else None,
        "ttft_ms": stats_ms([r.ttft for r in ok]), "tpot_ms": stats_ms([r.tpot for r in ok]),
        "itl_ms": stats_ms([x for r in ok for x in r.itls]), "e2e_ms": stats_ms([r.e2e for r in ok]),
    }


def sustained_rate(runs: list[dict], slo: dict[str, float], concurrency: Optional[int]) -> Optional[float]:
    """The highest finite request rate R (of the runs at this max concurrency) such that every swept rate
    up to R completed every request with the p99 of each targeted latency within its target; None if
    the lowest rate already missed (or there are no targets)."""
    best = None
    for r in sorted((r for r in runs if r["max_concurrency"] == concurrency and r["request_rate"] != "inf"),
                    key=lambda r: r["request_rate"]):
        if not slo or r["failed"] or any(r[f"{k}_ms"]["p99"] > v for k, v in slo.items()):
            break
        best = r["request_rate"]
    return best


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:200", "tpot:30"] -> {"ttft": 200.0, "tpot": 30.0} (milliseconds)."""
    slo = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2e") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2e:MS, not {item!r}")
        slo[key] = float(value)
    return slo


def server_facts(url: str, headers: dict, model: Optional[str]) -> tuple[str, int, bool]:
    """(model, its max_model_len, whether it has a tokenizer) from /v1/models and /tokenize."""
    cards = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
    card = next((c for c in cards if c["id"] == model), None) if model else cards[0]
    if card is None:
        raise ValueError(f"{model!r} is not served at {url} ({[c['id'] for c in cards]})")
    tok = httpx.post(f"{url}/tokenize", json={"model": card["id"], "prompt": "a"}, headers=headers, timeout=30)
    return card["id"], int(card.get("max_model_len") or 2048), tok.status_code == 200


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("TTFT", "TPOT", "end-to-end latency")):
        for conc in sorted({r["max_concurrency"] or 0 for r in runs}):
            pts = sorted((r["request_throughput"], r[metric]) for r in runs if (r["max_concurrency"] or 0) == conc)
            for p in ("p50", "p99"):
                ax.plot([x for x, _ in pts], [m[p] for _, m in pts], marker="o",
                        label=f"{p}" + (f", concurrency {conc}" if conc else ""))
        ax.set_xlabel("achieved request rate (requests/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="A server or a router.")
    p.add_argument("--model", default=None, help="Default: the first model /v1/models lists.")
    p.add_argument("--api-key", default=os.environ.get("VLLM_ENGINE_API_KEY"))
    p.add_argument("--dataset", default="random", choices=["random", "sharegpt-like"])
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths vary by this fraction.")
    p.add_argument("--prefix-len", type=int, default=0, help="Tokens every prompt shares at its start.")
    p.add_argument("--vocab-size", type=int, default=256, help="Prompt ids are drawn below this.")
    p.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="Requests/s, one sweep point each (inf: all at once).")
    p.add_argument("--max-concurrency", type=int, nargs="+", default=[0], help="0: no limit.")
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of the arrivals (1: Poisson).")
    p.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS", help="Latency targets: ttft:MS tpot:MS e2e:MS.")
    p.add_argument("--warmup", type=int, default=4, help="Unmeasured requests sent (all at once) first.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results.")
    p.add_argument("--plot", default=None, help="PNG of latency against achieved request rate.")
    args = p.parse_args(argv)
    slo = parse_goodput(args.goodput)
    url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model, max_model_len, has_tokenizer = server_facts(url, headers, args.model)
    if not has_tokenizer:
        print(f"{model} has no tokenizer (dummy weights?): asking for token logprobs to see each step's token")
    requests = make_requests(args.dataset, args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                             args.prefix_len, args.vocab_size, max_model_len, args.seed)
    if args.warmup:
        warm = make_requests(args.dataset, args.warmup, args.input_len, args.output_len, args.range_ratio, 0,
                             args.vocab_size, max_model_len, args.seed + 1)
        asyncio.run(run_point(url, model, warm, math.inf, None, 1.0, args.seed, headers, not has_tokenizer))
    runs = []
    print(f"{'rate':>6} {'conc':>5} {'done':>5} {'fail':>4} {'req/s':>7} {'out tok/s':>9} {'TTFT p50/p99 ms':>17} "
          f"{'TPOT p50/p99 ms':>17} {'ITL p99':>8} {'goodput':>7}")
    for conc in args.max_concurrency:
        for rate in args.request_rate:
            results, seconds = asyncio.run(run_point(url, model, requests, rate, conc or None, args.burstiness,
                                                     args.seed, headers, not has_tokenizer))
            row = {"request_rate": rate if math.isfinite(rate) else "inf", "max_concurrency": conc or None,
                   **summarize(results, seconds, requests, slo)}
            runs.append(row)
            t, o = row["ttft_ms"], row["tpot_ms"]
            print(f"{rate:>6} {conc or '-':>5} {row['completed']:>5} {row['failed']:>4} {row['request_throughput']:>7.2f} "
                  f"{row['output_throughput']:>9.1f} {t['p50']:>8.1f}/{t['p99']:<8.1f} {o['p50']:>8.1f}/{o['p99']:<8.1f} "
                  f"{row['itl_ms']['p99']:>8.1f} {row['goodput'] if row['goodput'] is None else round(row['goodput'], 2)!s:>7}")
    data = {"base_url": url, "model": model, "has_tokenizer": has_tokenizer, "dataset": args.dataset, "num_prompts": args.num_prompts,
            "input_len": args.input_len, "output_len": args.output_len, "prefix_len": args.prefix_len,
            "burstiness": args.burstiness, "goodput_slo_ms": slo, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": runs, "sustained_request_rate": {str(c or None): sustained_rate(runs, slo, c or None)
                                                     for c in args.max_concurrency}}
    if slo:
        print("highest request rate with every p99 within", slo, "ms:", data["sustained_request_rate"])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(data, f, indent=2)
    if args.plot:
        plot(runs, args.plot)
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
