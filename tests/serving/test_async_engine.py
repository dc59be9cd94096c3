"""AsyncEngine on the tiny random Llama: streaming, the offline API as reference, aborts freeing KV
blocks, a crashing loop failing every request, a full queue, and a responsive event loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from vllm_engine import Engine, SamplingParams
from vllm_engine.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError

from .conftest import ENGINE_KWARGS

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello, my name is", "The capital of France", "A paged KV cache", "def fibonacci(n):", "One two three"]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(model=str(tiny_dir), **ENGINE_KWARGS)


class ProxyEngine:
    """Wraps the module's Engine: optional delay per step, a step that raises once armed; its
    shutdown leaves the engine to the next test."""

    def __init__(self, inner: Engine, step_delay: float = 0.0) -> None:
        self.inner, self.step_delay, self.explode = inner, step_delay, False

    def step(self):
        if self.explode:
            raise RuntimeError("boom: simulated model failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        return self.inner.step()

    def shutdown(self) -> None:
        """The module's engine outlives each AsyncEngine (Engine.shutdown would release it)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def _wait_idle(ae: AsyncEngine, timeout: float = 10.0):
    deadline = time.time() + timeout
    while True:
        s = await ae.get_stats()
        if (s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks) or \
                time.time() > deadline:
            return s
        await asyncio.sleep(0.02)


def test_streams_cumulative_outputs_equal_to_the_offline_api(engine):
    params = SamplingParams(max_tokens=12, **GREEDY)

    async def main():
        ae = AsyncEngine(ProxyEngine(engine))
        try:
            streamed = [o async for o in ae.generate(PROMPTS[0], params.clone(), "r-stream")]
            finals = await asyncio.gather(*(ae.generate_async(p, params.clone()) for p in PROMPTS))
            return streamed, finals
        finally:
            ae.shutdown()

    streamed, finals = asyncio.run(main())
    refs = engine.generate(PROMPTS, params, use_tqdm=False)
    assert streamed[-1].finished and not any(o.finished for o in streamed[:-1])
    lengths = [len(o.token_ids) for o in streamed]
    assert lengths == sorted(lengths) and lengths[-1] == 12
    for a, b in zip(streamed, streamed[1:]):
        assert b.token_ids[: len(a.token_ids)] == a.token_ids and b.text.startswith(a.text)
    assert streamed[-1].token_ids == refs[0].token_ids and streamed[-1].text == refs[0].text
    for out, ref in zip(finals, refs):
        assert out.token_ids == ref.token_ids and out.text == ref.text


def test_closing_or_cancelling_a_stream_aborts_and_frees_every_block(engine):
    params = SamplingParams(max_tokens=200, **GREEDY)

    async def main():
        ae = AsyncEngine(ProxyEngine(engine))
        try:
            gen = ae.generate(PROMPTS[1], params.clone(), "r-close")
            first = await gen.__anext__()
            busy = await ae.get_stats()
            await gen.aclose()  # the client went away
            after_close = await _wait_idle(ae)

            started = asyncio.Event()

            async def consume():
                async for _ in ae.generate(PROMPTS[2], params.clone(), "r-cancel"):
                    started.set()

            task = asyncio.ensure_future(consume())
            await started.wait()  # cancel mid-generation (200 tokens take ~0.1 s on a fast CPU)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            after_cancel = await _wait_idle(ae)

            stream = await ae.add_request(PROMPTS[3], params.clone(), "r-abort")
            await stream.__anext__()
            await ae.abort("r-abort")
            rest = [o async for o in stream]  # the stream simply ends
            after_abort = await _wait_idle(ae)
            return first, busy, after_close, after_cancel, rest, after_abort, ae.num_in_flight
        finally:
            ae.shutdown()

    first, busy, after_close, after_cancel, rest, after_abort, in_flight = asyncio.run(main())
    assert not first.finished and busy.num_free_blocks < busy.num_total_blocks
    for s in (after_close, after_cancel, after_abort):
        assert s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks
    assert rest == [] and in_flight == 0
    engine.scheduler.check_integrity()


def test_a_crash_in_the_loop_fails_every_request_and_marks_the_engine_dead(tiny_dir):
    proxy = ProxyEngine(Engine(model=str(tiny_dir), **ENGINE_KWARGS))
    dead_calls: list[BaseException] = []

    async def main():
        ae = AsyncEngine(proxy)
        ae.add_dead_callback(dead_calls.append)
        streams = [await ae.add_request(p, SamplingParams(max_tokens=200, **GREEDY)) for p in PROMPTS[:3]]
        for s in streams:
            await s.__anext__()
        proxy.explode = True
        errors = []
        for s in streams:
            with pytest.raises(EngineDeadError) as e:
                async for _ in s:
                    pass
            errors.append(e.value)
        with pytest.raises(EngineDeadError):
            await ae.generate_async(PROMPTS[0], SamplingParams(max_tokens=2))
        return ae, errors

    ae, errors = asyncio.run(asyncio.wait_for(main(), 30))
    assert not ae.is_healthy and len(errors) == 3
    assert "boom" in str(ae.dead_error.__cause__) and len(dead_calls) == 1


def test_max_waiting_requests_rejects_with_queue_full(tiny_dir):
    engine = Engine(model=str(tiny_dir), max_num_seqs=1, max_waiting_requests=1, **ENGINE_KWARGS)

    async def main():
        ae = AsyncEngine(ProxyEngine(engine))
        try:
            long = SamplingParams(max_tokens=100, **GREEDY)
            running = await ae.add_request(PROMPTS[0], long.clone(), "running")
            await running.__anext__()  # scheduled: it runs, it no longer waits
            waiting = await ae.add_request(PROMPTS[1], long.clone(), "waiting")
            with pytest.raises(QueueFullError):
                await ae.add_request(PROMPTS[2], long.clone(), "rejected")
            with pytest.raises(ValueError, match="already in use"):
                await ae.add_request(PROMPTS[2], long.clone(), "waiting")
            running.close()
            waiting.close()
            return await _wait_idle(ae)
        finally:
            ae.shutdown()

    s = asyncio.run(main())
    assert s.num_free_blocks == s.num_total_blocks


def test_invalid_requests_raise_value_error_naming_the_problem(engine):
    async def main():
        ae = AsyncEngine(ProxyEngine(engine))
        try:
            with pytest.raises(ValueError, match="maximum context length is 256"):
                await ae.add_request(list(range(5, 305)), SamplingParams(max_tokens=2))
            with pytest.raises(ValueError, match="empty"):
                await ae.add_request("", SamplingParams(max_tokens=2))
            return await ae.generate_async(PROMPTS[0], SamplingParams(max_tokens=3, **GREEDY))
        finally:
            ae.shutdown()

    assert len(asyncio.run(main()).token_ids) == 3  # the loop survived the bad requests


def test_the_event_loop_stays_responsive_while_steps_run(engine):
    proxy = ProxyEngine(engine, step_delay=0.25)

    async def main():
        ae = AsyncEngine(proxy)
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        t = asyncio.ensure_future(ticker())
        t0 = time.perf_counter()
        await ae.generate_async(PROMPTS[0], SamplingParams(max_tokens=4, **GREEDY))
        elapsed = time.perf_counter() - t0
        done.set()
        await t
        ae.shutdown()
        return gaps, elapsed

    gaps, elapsed = asyncio.run(main())
    assert elapsed >= 4 * 0.25  # the steps really were slow...
    assert max(gaps) < 0.2  # ...yet the event loop kept ticking every ~10 ms
