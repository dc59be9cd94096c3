"""Issue 5 through the whole engine: prefix caching changes no output and skips the cached tokens;
priority scheduling lets a late urgent request overtake; swap preemption changes no output."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_engine import Engine, SamplingParams


def _greedy(n: int = 6, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def _engine(model_dir, **kw) -> Engine:
    kw.setdefault("max_model_len", 512)
    return Engine(model=model_dir, dtype="float32", seed=0, **kw)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_outputs_identical_with_and_without_prefix_caching(model_dir, block_size):
    rng = np.random.default_rng(block_size)
    shared = rng.integers(5, 250, 37).tolist()  # not a multiple of most block sizes: partial-block prefixes
    prompts = [shared + rng.integers(5, 250, int(k)).tolist() for k in (0, 1, 5, 16, 23)] + [shared[:10]]
    on, off = _engine(model_dir, block_size=block_size), _engine(model_dir, block_size=block_size,
                                                                enable_prefix_caching=False)
    for params in (_greedy(), _greedy(n=4, logprobs=1), SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=5,
                                                                        ignore_eos=True)):
        # Twice on the cached engine: the second pass hits the cache for every prompt.
        for _ in range(2):
            a = on.generate(prompts, params, use_tqdm=False)
            b = off.generate(prompts, params, use_tqdm=False)
            assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    assert on.get_stats().prefix_cache_hits > 0 and off.get_stats().prefix_cache_hits == 0
    on.scheduler.check_integrity()
    off.scheduler.check_integrity()


def test_shared_20_block_prefix_computes_only_the_rest(model_dir):
    engine = _engine(model_dir, block_size=16)
    rng = np.random.default_rng(0)
    prefix = rng.integers(5, 250, 20 * 16).tolist()
    first = engine.generate(prefix + [7, 8, 9], _greedy(), use_tqdm=False)
    before = engine.model_runner.num_tokens_processed
    second = engine.generate(prefix + [11, 12, 13, 14, 15], _greedy(), use_tqdm=False)
    processed = engine.model_runner.num_tokens_processed - before
    assert second.num_cached_tokens == 20 * 16
    assert processed == 5 + 5  # the 5 uncached prompt tokens, then 5 decode steps
    assert first.num_cached_tokens == 0
    # The cached result equals a fresh engine's.
    fresh = _engine(model_dir, block_size=16, enable_prefix_caching=False)
    assert fresh.generate(prefix + [11, 12, 13, 14, 15], _greedy(), use_tqdm=False).token_ids == second.token_ids


def test_priority_request_overtakes_a_full_batch(model_dir):
    engine = _engine(model_dir, max_num_seqs=2, scheduling_policy="priority")
    finished: list[str] = []

    def step():
        for o in engine.step():
            if o.finished:
                finished.append(o.request_id)

    for i in range(4):  # low priority, arriving first
        engine.add_request(f"low-{i}", [5 + i] * 8, _greedy(20), priority=10)
    step()
    step()
    engine.add_request("urgent", [3] * 8, _greedy(3), priority=0)
    while engine.has_unfinished_requests():
        step()
    assert finished[0] == "urgent"
    lows = [f for f in finished if f.startswith("low")]
    assert lows == sorted(lows)  # FCFS within a priority level
    assert engine.get_stats().num_preemptions_total >= 1
    engine.scheduler.check_integrity()


def test_swap_preemption_keeps_outputs(model_dir):
    prompts = [[5 + i] * 9 for i in range(5)]
    ref = _engine(model_dir).generate(prompts, _greedy(12), use_tqdm=False)
    engine = _engine(model_dir, block_size=4, num_gpu_blocks_override=10, preemption_mode="swap", swap_space=0.01)
    got = engine.generate(prompts, _greedy(12), use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    stats = engine.get_stats()
    assert stats.num_swaps_total > 0
    assert stats.num_free_blocks == stats.num_total_blocks
    engine.scheduler.check_integrity()


def test_prompt_logprobs_are_complete_on_a_cached_prompt(model_dir):
    engine = _engine(model_dir, block_size=4)
    prompt = list(range(5, 45))
    first = engine.generate(prompt, _greedy(2, prompt_logprobs=1), use_tqdm=False)
    again = engine.generate(prompt, _greedy(2, prompt_logprobs=1), use_tqdm=False)
    assert len(first.prompt_logprobs) == len(again.prompt_logprobs) == len(prompt)
    got = [d[t].logprob for d, t in zip(again.prompt_logprobs[1:], prompt[1:])]
    want = [d[t].logprob for d, t in zip(first.prompt_logprobs[1:], prompt[1:])]
    assert got == pytest.approx(want, abs=1e-5)
    # Without prompt logprobs the same prompt hits the cache.
    assert engine.generate(prompt, _greedy(2), use_tqdm=False).num_cached_tokens == 36
