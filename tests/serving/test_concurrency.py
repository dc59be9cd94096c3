"""Load and disconnects against the real server process: 64 concurrent streams (each checked against
the offline engine), /metrics while they run, and clients that vanish mid-request (their KV blocks
must all come back)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai

from vllm_engine import SamplingParams

from .conftest import parse_metrics

WORDS = ["fox", "dog", "cache", "block", "Paris", "Seine", "sunny", "warm"]


def _metrics(server: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{server}/metrics", timeout=10).text)


def _wait_idle(server: str, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        m = _metrics(server)
        idle = m["vllm_engine:num_requests_running"] == 0 and m["vllm_engine:num_requests_waiting"] == 0
        if idle and m["vllm_engine:kv_cache_free_blocks"] == m["vllm_engine:kv_cache_total_blocks"]:
            return m
        assert time.time() < deadline, f"not idle: {m}"
        time.sleep(0.05)


NEW_TOKENS = 48


def test_64_concurrent_streams_complete_correctly_and_show_in_metrics(server, offline):
    # Long enough (~0.1 s batched on a fast CPU) that the metrics poller sees the requests in flight.
    prompts = [f"Request {i}: the {WORDS[i % 8]} and the {WORDS[(i * 3) % 8]}" for i in range(64)]
    refs = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    before = _wait_idle(server)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, list]:
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks

    async def main():
        seen_running: list[float] = []
        done = asyncio.Event()

        async def watch():
            async with httpx.AsyncClient() as http:
                while not done.is_set():
                    m = parse_metrics((await http.get(f"{server}/metrics")).text)
                    seen_running.append(m["vllm_engine:num_requests_running"] + m["vllm_engine:num_requests_waiting"])
                    await asyncio.sleep(0.02)

        watcher = asyncio.ensure_future(watch())
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120) as client:
            results = await asyncio.gather(*(one(client, p) for p in prompts))
        done.set()
        await watcher
        return results, seen_running

    results, seen = asyncio.run(main())
    for (text, chunks), ref in zip(results, refs):
        assert text == ref.text
        assert chunks[-1].usage.completion_tokens == NEW_TOKENS and chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)
    assert max(seen) >= 8  # many requests were in the engine at once
    after = _wait_idle(server)
    key = "vllm_engine:request_success_total{finished_reason=length}"
    assert after[key] - before.get(key, 0) == 64
    assert after["vllm_engine:generation_tokens_total"] - before["vllm_engine:generation_tokens_total"] == 64 * NEW_TOKENS
    assert after["vllm_engine:prompt_tokens_total"] - before["vllm_engine:prompt_tokens_total"] == \
        sum(len(r.prompt_token_ids) for r in refs)
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        name = f"vllm_engine:{hist}_count"
        assert after[name] - before.get(name, 0) == 64, hist
    itl = "vllm_engine:inter_token_latency_seconds_count"
    assert after[itl] - before.get(itl, 0) == 64 * (NEW_TOKENS - 1)
    gen = "vllm_engine:request_generation_tokens_sum"
    assert after[gen] - before.get(gen, 0) == 64 * NEW_TOKENS
    assert 0.0 <= after["vllm_engine:kv_cache_usage_perc"] <= 1.0


def test_disconnected_clients_are_aborted_and_every_block_is_freed(server):
    before = _wait_idle(server)
    long = {"model": "tiny", "prompt": "A client that leaves early", "max_tokens": 220, "ignore_eos": True}
    # 1) a streaming client reads two events, then closes the connection
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server}/v1/completions", json={**long, "stream": True}) as r:
            lines = (line for line in r.iter_lines() if line)
            got = [next(lines), next(lines)]
            busy = _metrics(server)
    assert all(g.startswith("data: ") for g in got)
    # 2) a non-streaming client gives up while its request runs (220 tokens take ~0.2 s: hang up as
    # soon as the server reports it running, not after a fixed time)
    async def give_up() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            post = asyncio.ensure_future(http.post(
                f"{server}/v1/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True,
                      "max_tokens": 220}))
            while not post.done() and _metrics(server)["vllm_engine:num_requests_running"] < 1:
                await asyncio.sleep(0.005)
            post.cancel()

    asyncio.run(give_up())
    after = _wait_idle(server)
    assert busy["vllm_engine:kv_cache_free_blocks"] < busy["vllm_engine:kv_cache_total_blocks"]
    key = "vllm_engine:request_success_total{finished_reason=abort}"
    assert after[key] - before.get(key, 0) == 2
    # far fewer tokens than the 2 x 220 asked for were generated
    assert after["vllm_engine:generation_tokens_total"] - before["vllm_engine:generation_tokens_total"] < 300
