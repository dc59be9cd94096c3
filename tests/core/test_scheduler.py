"""Scheduler scenarios with no model: a simulated runner whose KV cache is a dict of written tokens.

The fake model samples ``f(tokens it reads back from the KV cache through the block table)``. A
wrong block table, a missed copy-on-write, a bad swap or a block reused too early changes what it
reads, and therefore the outputs, which are compared with a plain loop that never batches anything.
"""

from __future__ import annotations

import pickle
from typing import Optional

import numpy as np
import pytest

from vllm_engine.config import CacheConfig, SchedulerConfig
from vllm_engine.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_engine.core.scheduler import Scheduler
from vllm_engine.engine.request import Request, RequestStatus
from vllm_engine.sampling_params import SamplingParams
from vllm_engine.worker.block_tables import HostBlockTables
from vllm_engine.worker.request_states import RequestStates, append_placeholders, fill_placeholders

BS = 4


def next_token(tokens: list[int], salt: int = 0) -> int:
    """The deterministic 'model': depends on every token and its position."""
    acc = salt * 7919
    for i, t in enumerate(tokens):
        acc = (acc * 1000003 + (i + 1) * (t + 17)) % 2**61
    return 10 + acc % 50


def reference(prompt: list[int], max_tokens: int, salt: int = 0, window: Optional[int] = None) -> list[int]:
    """``window``: the model sees only the last ``window`` tokens (sliding-window attention)."""
    out: list[int] = []
    while len(out) < max_tokens:
        seq = prompt + out
        out.append(next_token(seq[-window:] if window else seq, salt))
    return out


class FakeRunner:
    """Carries out swaps and copies, writes each step's tokens into a simulated KV cache, samples from it.

    Like the model runner, it sees only the step's ``ExecuteModelRequest`` and keeps its own request
    states and block-table rows from it (``worker/request_states.RequestStates``), appending the
    tokens it samples; every step checks them against the scheduler's own tables and tokens."""

    def __init__(self, block_size: int = BS, window: Optional[int] = None) -> None:
        self.bs = block_size
        self.window = window  # sliding-window attention: the model reads only the last `window` positions
        self.gpu: dict[tuple[int, int], tuple[int, int]] = {}  # (block, slot) -> (position, token)
        self.cpu: dict[tuple[int, int], tuple[int, int]] = {}
        self.tokens_computed = 0
        self.states = RequestStates(HostBlockTables(rows=2))  # few rows: they are freed, reused and doubled

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        bs = self.bs
        msg = pickle.loads(pickle.dumps(so.execute_model_request))  # what another process would get
        states = self.states.update(msg)
        rows, lens = self.states.host_tables.gather(msg.req_ids)
        tables = [rows[i, :n].tolist() for i, n in enumerate(lens)]
        assert tables == so.block_tables, "a kept block-table row differs from the scheduler's table"
        assert not rows[np.arange(rows.shape[1]) >= lens[:, None]].any(), "ids past a table's end"
        for st, r in zip(states, so.scheduled_requests):
            assert st.token_ids == r.all_token_ids and st.num_computed_tokens == r.num_computed_tokens
        for g, c in so.blocks_to_swap_out:
            for s in range(bs):
                self.cpu.pop((c, s), None)
                if (g, s) in self.gpu:
                    self.cpu[(c, s)] = self.gpu[(g, s)]
        for c, g in so.blocks_to_swap_in:
            for s in range(bs):
                self.gpu.pop((g, s), None)
                if (c, s) in self.cpu:
                    self.gpu[(g, s)] = self.cpu[(c, s)]
        for src, dst in so.blocks_to_copy:
            for s in range(bs):
                self.gpu.pop((dst, s), None)
                if (src, s) in self.gpu:
                    self.gpu[(dst, s)] = self.gpu[(src, s)]
        written: set[tuple[int, int]] = set()
        for r, n, bt in zip(so.scheduled_requests, so.num_scheduled_tokens, tables):
            start = r.num_computed_tokens
            assert 0 < n and start + n <= r.num_tokens and len(bt) * bs >= start + n
            for p in range(start, start + n):
                slot = (bt[p // bs], p % bs)
                assert slot not in written, "two requests write the same KV slot in one step"
                written.add(slot)
                self.gpu[slot] = (p, r.all_token_ids[p])
        self.tokens_computed += so.total_num_scheduled_tokens
        sampled: list[Optional[int]] = []
        for r, n, bt in zip(so.scheduled_requests, so.num_scheduled_tokens, tables):
            end = r.num_computed_tokens + n
            if end < r.num_tokens:
                sampled.append(None)
                continue
            seen = []
            for p in range(max(0, end - self.window) if self.window else 0, end):
                pos, tok = self.gpu.get((bt[p // bs], p % bs), (-1, -1))
                seen.append(tok if pos == p else -1)
            sampled.append(next_token(seen, r.sample_index))
        done = [(st, token) for st, token in zip(states, sampled) if token is not None]
        fill_placeholders([st for st, _ in done], append_placeholders([st for st, _ in done]), [t for _, t in done])
        return ModelRunnerOutput(req_ids=[r.request_id for r in so.scheduled_requests],
                                 sampled_token_ids=[[t] if t is not None else [] for t in sampled])


def make(num_blocks: int = 64, budget: int = 64, max_seqs: int = 16, policy: str = "fcfs", mode: str = "recompute",
         caching: bool = True, num_cpu_blocks: int = 0, max_model_len: int = 1024,
         pipeline_depth: int = 1, sliding_window: Optional[int] = None) -> Scheduler:
    sc = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                         policy=policy, preemption_mode=mode)
    cache = CacheConfig(block_size=BS, enable_prefix_caching=caching, sliding_window=sliding_window)
    return Scheduler(sc, cache, num_blocks, num_cpu_blocks, pipeline_depth=pipeline_depth)


def req(rid: str, prompt: list[int], max_tokens: int = 8, priority: int = 0, arrival: Optional[float] = None,
        **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, **kw)
    return Request(rid, prompt, params, arrival_time=arrival, priority=priority, max_tokens=max_tokens)


def step(s: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[Request]]:
    so = s.schedule()
    cfg = s.config
    assert so.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(so.scheduled_requests) <= cfg.max_num_seqs and s.num_running <= cfg.max_num_seqs
    kv = s.kv_cache_manager
    for r, bt in zip(so.scheduled_requests, so.block_tables):
        first = r.num_computed_tokens // BS
        for b in kv.req_blocks[r.request_id][first:]:
            assert b.ref_cnt == 1, "a step writes into a shared block"
    updated = s.update_from_output(so, runner.execute(so))
    s.check_integrity()
    return so, updated


def drain(s: Scheduler, runner: FakeRunner, max_steps: int = 2000) -> list[SchedulerOutput]:
    outs = []
    while s.has_unfinished_requests():
        outs.append(step(s, runner)[0])
        assert len(outs) < max_steps, "no progress"
    assert s.kv_cache_manager.num_free_blocks == s.num_gpu_blocks
    runner.execute(s.schedule())  # an empty step: it tells the worker which requests ended last
    assert len(runner.states) == 0, "the worker kept state of finished requests"
    return outs


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    return [[(seed * 131 + i * 31 + j * 7) % 97 for j in range(length + i % 3)] for i in range(n)]


# ---- budget, chunking, max_num_seqs ----------------------------------------------------------------
def test_long_prompt_is_chunked_while_decodes_keep_running():
    s, runner = make(budget=16), FakeRunner()
    a = req("a", prompts(1, 5)[0], max_tokens=12)
    s.add_request(a)
    step(s, runner)
    long = req("long", list(range(40)), max_tokens=3)
    s.add_request(long)
    chunks = []
    while long.num_output_tokens == 0:
        so, _ = step(s, runner)
        assert so.scheduled_requests[0] is a and so.num_scheduled_tokens[0] == 1  # the decode never waits
        chunks.append(so.num_scheduled_tokens[1])
    assert chunks == [15, 15, 10]
    drain(s, runner)
    assert a.output_token_ids == reference(a.prompt_token_ids, 12)
    assert long.output_token_ids == reference(list(range(40)), 3)


def test_max_num_seqs_caps_the_batch():
    s, runner = make(max_seqs=2), FakeRunner()
    rs = [req(str(i), p, max_tokens=4) for i, p in enumerate(prompts(5, 6))]
    for r in rs:
        s.add_request(r)
    outs = drain(s, runner)
    assert max(len(o.scheduled_requests) for o in outs) == 2
    for r in rs:
        assert r.output_token_ids == reference(r.prompt_token_ids, 4)
    # FCFS: requests start in arrival order.
    firsts = [r.first_scheduled_time for r in rs]
    assert firsts == sorted(firsts)


# ---- preemption -------------------------------------------------------------------------------------
@pytest.mark.parametrize("caching", [True, False])
def test_recompute_preemption_keeps_outputs(caching):
    s, runner = make(num_blocks=12, caching=caching), FakeRunner()
    rs = [req(str(i), p, max_tokens=14) for i, p in enumerate(prompts(6, 9))]
    for r in rs:
        s.add_request(r)
    outs = drain(s, runner)
    assert sum(o.num_preemptions for o in outs) == s.get_stats().num_preemptions_total > 0
    assert sum(r.num_preemptions for r in rs) == s.get_stats().num_preemptions_total
    assert all(o.blocks_to_swap_out == [] for o in outs)
    for r in rs:
        assert r.output_token_ids == reference(r.prompt_token_ids, 14)
        assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_swap_preemption_keeps_outputs_without_recomputing():
    s, runner = make(num_blocks=12, mode="swap", num_cpu_blocks=32), FakeRunner()
    rs = [req(str(i), p, max_tokens=14) for i, p in enumerate(prompts(6, 9))]
    for r in rs:
        s.add_request(r)
    outs = drain(s, runner)
    stats = s.get_stats()
    assert stats.num_swaps_total > 0 and stats.num_swaps_total == sum(o.num_swaps for o in outs)
    assert sum(len(o.blocks_to_swap_out) for o in outs) == sum(len(o.blocks_to_swap_in) for o in outs)
    # Swapped KV comes back from CPU: every token is computed exactly once.
    assert runner.tokens_computed == sum(r.num_prompt_tokens + 14 - 1 for r in rs)
    for r in rs:
        assert r.output_token_ids == reference(r.prompt_token_ids, 14)
    assert s.kv_cache_manager.num_free_cpu_blocks + len(s.kv_cache_manager.take_swap_ins()) == 32


def test_swap_falls_back_to_recompute_without_cpu_space():
    s, runner = make(num_blocks=12, mode="swap", num_cpu_blocks=1), FakeRunner()
    rs = [req(str(i), p, max_tokens=14) for i, p in enumerate(prompts(6, 9))]
    for r in rs:
        s.add_request(r)
    outs = drain(s, runner)
    assert s.get_stats().num_preemptions_total > s.get_stats().num_swaps_total
    assert not any(o.blocks_to_swap_out for o in outs)
    for r in rs:
        assert r.output_token_ids == reference(r.prompt_token_ids, 14)


def test_sequence_outgrowing_the_whole_cache_is_length_capped():
    s, runner = make(num_blocks=3), FakeRunner()
    a = req("a", [1, 2, 3, 4, 5], max_tokens=50)
    s.add_request(a)
    _, updated = step(s, runner)
    while s.has_unfinished_requests():
        _, updated = step(s, runner)
    assert a.status == RequestStatus.FINISHED_LENGTH_CAPPED and a in updated
    assert a.num_tokens == 3 * BS + 1  # 12 tokens computed and one sampled token that no block can hold
    assert a.output_token_ids == reference(a.prompt_token_ids, 8)


# ---- priority -------------------------------------------------------------------------------------
def test_priority_late_request_preempts_and_finishes_first():
    s, runner = make(max_seqs=2, policy="priority"), FakeRunner()
    low = [req(f"low{i}", p, max_tokens=20, priority=1, arrival=float(i)) for i, p in enumerate(prompts(2, 6))]
    for r in low:
        s.add_request(r)
    for _ in range(3):
        step(s, runner)
    high = req("high", [9, 8, 7, 6, 5], max_tokens=4, priority=0, arrival=10.0)
    s.add_request(high)
    finished_order = []
    while s.has_unfinished_requests():
        finished_order += [r.request_id for r in step(s, runner)[1] if r.is_finished()]
    assert finished_order[0] == "high"
    assert low[1].num_preemptions == 1 and low[0].num_preemptions == 0  # the later arrival was preempted
    for r in low + [high]:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)


def test_priority_preempts_for_blocks_and_fcfs_within_a_level():
    s, runner = make(num_blocks=8, policy="priority"), FakeRunner()
    hog = req("hog", list(range(20)), max_tokens=8, priority=5)
    s.add_request(hog)
    step(s, runner)  # 6 of 8 blocks
    same = [req(f"p1-{i}", p, max_tokens=3, priority=1, arrival=100.0 + i) for i, p in enumerate(prompts(3, 5))]
    for r in reversed(same):  # added out of order: arrival time decides within a level
        s.add_request(r)
    so, _ = step(s, runner)
    assert hog.status == RequestStatus.PREEMPTED and hog in so.preempted_requests
    drain(s, runner)
    firsts = [r.first_scheduled_time for r in same]
    assert firsts == sorted(firsts)
    for r in same + [hog]:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)


def test_priority_with_swap_mode_swaps_the_worst_out_and_back_in():
    s, runner = make(num_blocks=10, max_seqs=4, policy="priority", mode="swap", num_cpu_blocks=20), FakeRunner()
    low = [req(f"low{i}", p, max_tokens=12, priority=2, arrival=float(i)) for i, p in enumerate(prompts(2, 10))]
    for r in low:
        s.add_request(r)
    for _ in range(3):
        step(s, runner)
    high = req("high", list(range(50, 63)), max_tokens=6, priority=0, arrival=9.0)
    s.add_request(high)
    so, _ = step(s, runner)
    assert high in so.scheduled_requests and so.blocks_to_swap_out and low[1].status == RequestStatus.SWAPPED
    done = []
    while s.has_unfinished_requests():
        done += [r.request_id for r in step(s, runner)[1] if r.is_finished()]
    assert done[0] == "high"
    assert runner.tokens_computed == sum(r.num_prompt_tokens + r.max_tokens - 1 for r in low + [high])
    for r in low + [high]:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)


def test_equal_priority_does_not_preempt():
    s, runner = make(max_seqs=1, policy="priority"), FakeRunner()
    a, b = req("a", [1, 2, 3], max_tokens=5, arrival=1.0), req("b", [4, 5, 6], max_tokens=5, arrival=2.0)
    s.add_request(a)
    step(s, runner)
    s.add_request(b)
    drain(s, runner)
    assert a.num_preemptions == b.num_preemptions == 0 and a.first_scheduled_time < b.first_scheduled_time


# ---- prefix caching ------------------------------------------------------------------------------
def test_prefix_cache_hit_schedules_only_uncached_tokens():
    s, runner = make(budget=256), FakeRunner()
    prefix = [(7 * i + 3) % 101 for i in range(20 * BS)]
    a = req("a", prefix + [1, 2, 3], max_tokens=2)
    s.add_request(a)
    drain(s, runner)
    b = req("b", prefix + [4, 5, 6, 7, 8], max_tokens=3)
    s.add_request(b)
    so, _ = step(s, runner)
    assert so.num_scheduled_tokens == [5] and b.num_cached_tokens == 20 * BS
    drain(s, runner)
    assert b.output_token_ids == reference(b.prompt_token_ids, 3)
    stats = s.get_stats()
    assert stats.prefix_cache_queries == a.num_prompt_tokens + b.num_prompt_tokens
    assert stats.prefix_cache_hits == 20 * BS
    # An identical prompt still computes its last token (to sample from it).
    c = req("c", list(b.prompt_token_ids), max_tokens=1)
    s.add_request(c)
    so, _ = step(s, runner)
    assert so.num_scheduled_tokens == [1] and c.num_cached_tokens == 84
    assert c.output_token_ids == reference(c.prompt_token_ids, 1)


def test_requests_arriving_together_compute_a_shared_prefix_once():
    s, runner = make(budget=256), FakeRunner()
    prefix = [(5 * i + 1) % 97 for i in range(6 * BS)]
    a, b, c = (req(x, prefix + tail, max_tokens=2) for x, tail in (("a", [1, 2]), ("b", [3]), ("c", [4, 5, 6])))
    for r in (a, b, c):
        s.add_request(r)
    so, _ = step(s, runner)
    # b and c wait while a computes the shared blocks, then reuse them.
    assert [r.request_id for r in so.scheduled_requests] == ["a"]
    so, _ = step(s, runner)
    assert {r.request_id: n for r, n in zip(so.scheduled_requests, so.num_scheduled_tokens)} == {"a": 1, "b": 1, "c": 3}
    assert b.num_cached_tokens == c.num_cached_tokens == 6 * BS
    drain(s, runner)
    for r in (a, b, c):
        assert r.output_token_ids == reference(r.prompt_token_ids, 2)
    s.check_integrity()
    # Without prefix caching nothing waits.
    s2, runner2 = make(budget=256, caching=False), FakeRunner()
    for x in "abc":
        s2.add_request(req(x, prefix + [9], max_tokens=1))
    so, _ = step(s2, runner2)
    assert len(so.scheduled_requests) == 3


# ---- n > 1 ------------------------------------------------------------------------------------------
def test_n_samples_fork_the_prompt_blocks():
    s, runner = make(budget=10, caching=False), FakeRunner()
    prompt = list(range(30, 48))  # 18 tokens: chunks of 10 and 8
    parent = req("x#0", prompt, max_tokens=5)
    kids = [Request(f"x#{i}", prompt, parent.sampling_params, max_tokens=5, sample_index=i, fork_from=parent)
            for i in (1, 2)]
    other = req("other", [1, 2, 3], max_tokens=5)
    for r in [parent] + kids + [other]:
        s.add_request(r)
    so, _ = step(s, runner)
    assert so.scheduled_requests == [parent]
    so, _ = step(s, runner)  # the kids wait for the prompt but do not block "other"
    assert kids[0] not in so.scheduled_requests and other in so.scheduled_requests
    while parent.num_output_tokens == 0:
        so, _ = step(s, runner)
    so, _ = step(s, runner)
    assert [so.num_scheduled_tokens[so.scheduled_requests.index(k)] for k in kids] == [1, 1]
    assert {src for src, _ in so.blocks_to_copy} == {s.kv_cache_manager.get_block_ids(parent)[4]}
    shared = s.kv_cache_manager.req_blocks[parent.request_id][:4]
    assert all(b.ref_cnt == 3 for b in shared)
    assert all(k.num_cached_tokens == 17 for k in kids)
    drain(s, runner)
    for r in [parent] + kids:
        assert r.output_token_ids == reference(prompt, 5, salt=r.sample_index)
    assert runner.tokens_computed == 18 + 2 + 3 * 4 + 3 + 4


def test_fork_child_computes_prompt_itself_if_parent_aborted():
    s, runner = make(budget=8), FakeRunner()
    prompt = list(range(20))
    parent = req("y#0", prompt, max_tokens=3)
    kid = Request("y#1", prompt, parent.sampling_params, max_tokens=3, sample_index=1, fork_from=parent)
    s.add_request(parent)
    s.add_request(kid)
    step(s, runner)
    s.finish_requests("y#0", RequestStatus.FINISHED_ABORTED)
    drain(s, runner)
    assert kid.fork_from is None and kid.output_token_ids == reference(prompt, 3, salt=1)


# ---- stop conditions ----------------------------------------------------------------------------------
class ScriptedRunner:
    """Samples fixed tokens: script[request_id][k] is the k-th output."""

    def __init__(self, script: dict[str, list[int]]) -> None:
        self.script = script

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        toks = [self.script[r.request_id][r.num_output_tokens] if r.num_computed_tokens + n == r.num_tokens else None
                for r, n in zip(so.scheduled_requests, so.num_scheduled_tokens)]
        return ModelRunnerOutput(req_ids=[r.request_id for r in so.scheduled_requests],
                                 sampled_token_ids=[[t] if t is not None else [] for t in toks])


def test_stop_conditions():
    s = make(max_model_len=12)
    eos = {2}
    cases = {
        "eos": (req("eos", [5, 5], max_tokens=9, min_tokens=0), [7, 2, 7], [7, 2], "stop", None),
        "min": (req("min", [5, 5], max_tokens=9, min_tokens=2), [2, 2, 2, 7], [2, 2, 2], "stop", None),
        "ign": (req("ign", [5, 5], max_tokens=3, ignore_eos=True), [2, 2, 2, 2], [2, 2, 2], "length", None),
        "ids": (req("ids", [5, 5], max_tokens=9, stop_token_ids=[8], min_tokens=1), [8, 8, 3], [8, 8], "stop", 8),
        "max": (req("max", [5, 5], max_tokens=3), [3, 4, 5, 6], [3, 4, 5], "length", None),
        "len": (req("len", [5] * 9, max_tokens=50), [3] * 10, [3, 3, 3], "length", None),
    }
    for r, *_ in cases.values():
        r.eos_token_ids = set() if r.sampling_params.ignore_eos else eos
        s.add_request(r)
    runner = ScriptedRunner({k: v[1] for k, v in cases.items()})
    while s.has_unfinished_requests():
        so = s.schedule()
        s.update_from_output(so, runner.execute(so))
        s.check_integrity()
    for name, (r, _, expected, reason, stop_reason) in cases.items():
        assert (r.output_token_ids, r.get_finish_reason(), r.stop_reason) == (expected, reason, stop_reason), name
    assert s.kv_cache_manager.num_free_blocks == s.num_gpu_blocks


def test_several_tokens_per_step_stop_at_the_first_that_ends_the_request():
    """A step may give a request several tokens (verified proposals): they are taken in order, the
    stop checks run after each, tokens after a stop are dropped, and the tokens not yet computed are
    scheduled by the next step like any token past num_computed_tokens."""
    s = make(max_model_len=64)
    eos = {2}
    cases = {  # prompt, max_tokens, the 3 tokens each step gives, expected output, finish reason
        "eos": (req("eos", [5, 5], max_tokens=20), [7, 8, 9, 4, 2, 9, 9, 9, 9], [7, 8, 9, 4, 2], "stop"),
        "max": (req("max", [5, 5, 5], max_tokens=4), [3, 4, 5, 6, 7, 8], [3, 4, 5, 6], "length"),
        "ids": (req("ids", [5], max_tokens=20, stop_token_ids=[6]), [1, 6, 1], [1, 6], "stop"),
    }
    for r, *_ in cases.values():
        r.eos_token_ids = eos
        s.add_request(r)
    scheduled_tokens = []
    while s.has_unfinished_requests():
        so = s.schedule()
        toks = []
        for r, n in zip(so.scheduled_requests, so.num_scheduled_tokens):
            scheduled_tokens.append((r.request_id, n))
            done = r.num_computed_tokens + n == r.num_tokens
            script = cases[r.request_id][1]
            toks.append(script[r.num_output_tokens: r.num_output_tokens + 3] if done else [])
        s.update_from_output(so, ModelRunnerOutput(req_ids=[r.request_id for r in so.scheduled_requests],
                                                   sampled_token_ids=toks))
        s.check_integrity()
    for name, (r, _, expected, reason) in cases.items():
        assert (r.output_token_ids, r.get_finish_reason()) == (expected, reason), name
    # After the prompt, each step computes the 3 tokens the previous step gave.
    assert [n for rid, n in scheduled_tokens if rid == "eos"] == [2, 3]
    assert s.kv_cache_manager.num_free_blocks == s.num_gpu_blocks


@pytest.mark.parametrize("num_blocks, mode", [(64, "recompute"), (14, "recompute"), (14, "swap")])
def test_pipeline_keeps_two_disjoint_balanced_steps_in_flight(num_blocks, mode):
    """pipeline_depth=2: a step is launched while the previous one is in flight. The two never share a
    request (a request waits until its token is known), each takes about half of the active
    requests, and a stage that never samples (the first) learns every token from the messages'
    new_token_ids. With few blocks, requests are preempted while their step is in flight."""
    from collections import deque

    s = make(num_blocks=num_blocks, budget=32, max_seqs=8, mode=mode, num_cpu_blocks=64, pipeline_depth=2)
    runner, first_stage = FakeRunner(), RequestStates(HostBlockTables(rows=2))
    rs = [req(str(i), p, max_tokens=7) for i, p in enumerate(prompts(6, 9))]
    for r in rs:
        s.add_request(r)
    in_flight: deque = deque()
    depths, sizes = [], []
    while s.has_unfinished_requests() or in_flight:
        if len(in_flight) < 2:
            active = s.num_running + s.num_waiting + s.num_swapped
            so = s.schedule()
            if not so.is_empty:
                ids = {r.request_id for r in so.scheduled_requests}
                assert all(ids.isdisjoint(r.request_id for r in o.scheduled_requests) for o, _ in in_flight)
                assert len(ids) <= -(-min(8, active) // 2)
                states = first_stage.update(pickle.loads(pickle.dumps(so.execute_model_request)))
                for st, r, n in zip(states, so.scheduled_requests, so.num_scheduled_tokens):
                    assert st.token_ids[: r.num_computed_tokens + n] == r.all_token_ids[: r.num_computed_tokens + n]
                out = runner.execute(so)
                s.advance(so)
                in_flight.append((so, out))
                depths.append(len(in_flight))
                sizes.append(len(ids))
                if len(in_flight) < 2:
                    continue
        so, out = in_flight.popleft()
        s.resolve(so, out)
        s.check_integrity()
    for r in rs:
        assert r.output_token_ids == reference(r.prompt_token_ids, 7), r.request_id
    assert max(depths) == 2 and max(sizes) == 3
    assert s.kv_cache_manager.num_free_blocks == s.num_gpu_blocks
    if num_blocks == 14:
        assert s.num_preemptions_total > 0


@pytest.mark.parametrize("mode, num_blocks", [("recompute", 64), ("recompute", 20), ("swap", 20)])
def test_sliding_window_frees_the_blocks_out_of_the_window(mode, num_blocks):
    """Window 10, blocks of 4: a request never holds more than the blocks its window and the step's
    new tokens touch, however long it grows; what it freed stays in the prefix cache (a second
    request with the same prompt hits it); outputs equal a model that sees the last 10 tokens, also
    through chunked prompts, n > 1 forks and preemption (recompute or swap) with few blocks."""
    window = 10
    s = make(num_blocks=num_blocks, budget=16, mode=mode, num_cpu_blocks=64, sliding_window=window)
    runner = FakeRunner(window=window)
    rs = [req(str(i), p, max_tokens=30) for i, p in enumerate(prompts(4, 26))]
    rs.append(req("fork", prompts(1, 12, seed=3)[0], max_tokens=20, n=2))
    rs.append(Request("fork#1", rs[-1].prompt_token_ids, rs[-1].sampling_params, max_tokens=20,
                      sample_index=1, fork_from=rs[-1]))
    for r in rs:
        s.add_request(r)
    peak = 0
    while s.has_unfinished_requests():
        so, _ = step(s, runner)
        kv = s.kv_cache_manager
        for r in s.running:
            held = kv.num_blocks_held(r)
            # the window's keys (10, starting anywhere in a block: up to 4 blocks) + this step's new tokens
            assert held <= cdiv_(window + 3, BS) + cdiv_(16, BS) + 1, (r.request_id, held)
            peak = max(peak, held)
    for r in rs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens, r.sample_index, window), r.request_id
    assert s.kv_cache_manager.num_free_blocks == s.num_gpu_blocks
    assert peak < cdiv_(26 + 2 + 30, BS)  # what one request would hold without the window
    if num_blocks == 20:
        assert s.num_preemptions_total > 0


def test_blocks_freed_by_the_window_stay_in_the_prefix_cache():
    window = 10
    s, runner = make(num_blocks=64, budget=16, sliding_window=window), FakeRunner(window=window)
    first = req("first", prompts(1, 26)[0], max_tokens=30)
    s.add_request(first)
    step(s, runner)
    step(s, runner)  # the prompt's second chunk: its first blocks are out of the window now
    assert s.kv_cache_manager.get_block_ids(first)[0] == 0 and s.kv_cache_manager.num_blocks_held(first) < 7
    drain(s, runner)
    again = req("again", first.prompt_token_ids, max_tokens=2)
    s.add_request(again)
    step(s, runner)
    assert again.num_cached_tokens == 24  # every full prompt block, the freed ones too
    drain(s, runner)
    assert again.output_token_ids == reference(again.prompt_token_ids, 2, 0, window)


def cdiv_(a: int, b: int) -> int:
    return -(-a // b)


# ---- aborts, rejection, bookkeeping ---------------------------------------------------------------
def _step_until(s: Scheduler, runner: FakeRunner, rs: list[Request], status: RequestStatus) -> Request:
    for _ in range(200):
        step(s, runner)
        hit = [r for r in rs if r.status == status]
        if hit:
            return hit[0]
    raise AssertionError(f"no request reached {status.name}")


def test_abort_waiting_and_mid_prefill():
    s, runner = make(budget=8), FakeRunner()
    rs = [req(f"r{i}", p, max_tokens=5) for i, p in enumerate(prompts(3, 12))]
    for r in rs:
        s.add_request(r)
    step(s, runner)
    assert rs[0].status == RequestStatus.RUNNING and 0 < rs[0].num_computed_tokens < rs[0].num_prompt_tokens
    s.finish_requests(["r0", "unknown"], RequestStatus.FINISHED_ABORTED)
    s.finish_requests("r2", RequestStatus.FINISHED_ABORTED)
    s.check_integrity()
    assert rs[0].get_finish_reason() == rs[2].get_finish_reason() == "abort"
    so, _ = step(s, runner)
    assert so.finished_request_ids == {"r0", "r2"}
    drain(s, runner)
    assert rs[1].output_token_ids == reference(rs[1].prompt_token_ids, 5)


@pytest.mark.parametrize("mode, status", [("recompute", RequestStatus.PREEMPTED), ("swap", RequestStatus.SWAPPED)])
def test_abort_preempted_or_swapped(mode, status):
    s, runner = make(num_blocks=12, mode=mode, num_cpu_blocks=32), FakeRunner()
    rs = [req(str(i), p, max_tokens=14) for i, p in enumerate(prompts(6, 9))]
    for r in rs:
        s.add_request(r)
    victim = _step_until(s, runner, rs, status)
    s.finish_requests([victim.request_id], RequestStatus.FINISHED_ABORTED)
    s.check_integrity()  # also checks the CPU pool got the swapped blocks back
    assert victim.request_id not in s.kv_cache_manager.swapped_blocks
    drain(s, runner)
    for r in rs:
        if r is not victim:
            assert r.output_token_ids == reference(r.prompt_token_ids, 14)


def test_abort_between_schedule_and_update_is_ignored():
    s, runner = make(), FakeRunner()
    a, b = req("a", [1, 2, 3], max_tokens=4), req("b", [4, 5, 6], max_tokens=4)
    s.add_request(a)
    s.add_request(b)
    step(s, runner)
    so = s.schedule()
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    updated = s.update_from_output(so, runner.execute(so))
    assert updated == [b] and a.num_output_tokens == 1 and a.status == RequestStatus.FINISHED_ABORTED
    s.check_integrity()
    so, _ = step(s, runner)
    assert so.finished_request_ids == {"a"}
    drain(s, runner)


def test_add_request_rejects_prompt_larger_than_the_cache():
    s = make(num_blocks=4)
    with pytest.raises(ValueError, match=r"needs 5 KV cache blocks.*only 4 blocks"):
        s.add_request(req("big", list(range(16))))  # 16 + 1 tokens -> 5 blocks of 4
    s.add_request(req("fits", list(range(15))))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("fits", [1]))
    assert s.num_waiting == 1 and s.get_request("fits") is not None and s.get_request("big") is None
    s.check_integrity()


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_matches_the_reference(seed):
    """Random arrivals (shared prefixes, n > 1, priorities) and aborts under a tiny cache, every config."""
    import random

    rng = random.Random(seed)
    s = make(num_blocks=rng.choice([10, 16]), budget=rng.choice([6, 16]), max_seqs=rng.choice([3, 8]),
             policy=rng.choice(["fcfs", "priority"]), mode=rng.choice(["recompute", "swap"]),
             caching=rng.random() < 0.7, num_cpu_blocks=rng.choice([4, 40]))
    runner = FakeRunner()
    prefixes = [[rng.randrange(97) for _ in range(9)] for _ in range(2)]
    all_reqs: list[Request] = []
    aborted: set[str] = set()
    for t in range(300):
        if t < 120 and rng.random() < 0.3:
            prompt = rng.choice(prefixes)[: rng.randrange(1, 10)] + [rng.randrange(97) for _ in range(rng.randrange(1, 8))]
            max_tokens, n = rng.randrange(1, 12), rng.choice([1, 1, 2, 3])
            params = SamplingParams(max_tokens=max_tokens)
            first = None
            for i in range(n):
                r = Request(f"{t}#{i}", prompt, params, priority=rng.randrange(3), max_tokens=max_tokens,
                            sample_index=i, fork_from=first, arrival_time=float(t))
                first = first or r
                s.add_request(r)
                all_reqs.append(r)
        if rng.random() < 0.04 and s.requests:
            victim = rng.choice(sorted(s.requests))
            aborted.add(victim)
            s.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
            s.check_integrity()
        if not s.has_unfinished_requests() and t >= 120:
            break
        step(s, runner)
    drain(s, runner)
    for r in all_reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.num_output_tokens, r.sample_index)
        if r.request_id not in aborted:
            assert r.num_output_tokens == r.max_tokens and r.get_finish_reason() == "length"
