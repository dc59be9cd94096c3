"""The scheduler with proposals: the same outputs as plain decoding, and only verified K/V cached.

A simulated runner keeps a KV cache of (position, token) per slot and samples the deterministic
'model' of tests/core/test_scheduler.py from what it reads back through the block table, so a
proposal's K/V read where a verified token's should be, a block cached with a rejected token in
it, or a verified token counted twice changes the outputs, which are compared with plain loops.
Greedy verification as the rejection sampler does it: a proposal is accepted while it equals the
model's token at its row.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tests.core.test_scheduler import BS, make, next_token, prompts, reference, req
from vllm_engine.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_engine.core.scheduler import Scheduler, SpecDecodeStats
from vllm_engine.worker.block_tables import HostBlockTables
from vllm_engine.worker.request_states import RequestStates


class SpecRunner:
    """Writes every scheduled token's K/V (proposals included) and verifies the proposals."""

    def __init__(self) -> None:
        self.gpu: dict[tuple[int, int], tuple[int, int]] = {}
        self.states = RequestStates(HostBlockTables(rows=2))

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        msg = pickle.loads(pickle.dumps(so.execute_model_request))
        states = self.states.update(msg)
        assert msg.spec_token_ids == so.spec_token_ids
        rows, lens = self.states.host_tables.gather(msg.req_ids)
        tables = [rows[i, :n].tolist() for i, n in enumerate(lens)]
        for src, dst in so.blocks_to_copy:
            for s in range(BS):
                self.gpu.pop((dst, s), None)
                if (src, s) in self.gpu:
                    self.gpu[(dst, s)] = self.gpu[(src, s)]
        out = []
        for st, r, n, bt in zip(states, so.scheduled_requests, so.num_scheduled_tokens, tables):
            assert st.token_ids == r.all_token_ids
            drafts = msg.spec_token_ids.get(r.request_id, [])
            seq = r.all_token_ids + drafts
            start = r.num_computed_tokens
            assert start + n <= len(seq) and len(bt) * BS >= start + n
            for p in range(start, start + n):
                self.gpu[(bt[p // BS], p % BS)] = (p, seq[p])
            end = start + n - len(drafts)
            if end < r.num_tokens:
                out.append([])
                continue
            tokens = []
            for j in range(len(drafts) + 1):  # row j: the model's token after position end - 1 + j
                seen = []
                for p in range(end + j):
                    pos, tok = self.gpu.get((bt[p // BS], p % BS), (-1, -1))
                    seen.append(tok if pos == p else -1)
                t = next_token(seen, r.sample_index)
                tokens.append(t)
                if j == len(drafts) or t != drafts[j]:
                    break
            st.token_ids.extend(tokens)
            st.output_token_ids.extend(tokens)
            out.append(tokens)
        return ModelRunnerOutput(req_ids=list(msg.req_ids), sampled_token_ids=out)


def propose(s: Scheduler, rng: np.random.Generator, k: int, refs: dict[str, list[int]]) -> None:
    """Proposals: the request's true continuation, each token corrupted with probability 0.3."""
    proposals = {}
    for r in s.running:
        if r.num_computed_tokens != r.num_tokens - 1:
            continue
        n_out = r.num_output_tokens
        true = refs[r.request_id][n_out: n_out + k]
        proposals[r.request_id] = [t if rng.random() < 0.7 else 99 for t in true]
    s.set_proposals(proposals)


def check_cached_blocks(s: Scheduler, runner: SpecRunner) -> None:
    """Every block in the prefix cache holds exactly the tokens its hash names."""
    for h, block in s.kv_cache_manager.pool.cached_blocks.items():
        depth, node = 0, h.parent
        while node is not None:
            depth, node = depth + 1, node.parent
        for slot, tok in enumerate(h.token_ids):
            assert runner.gpu.get((block.block_id, slot)) == (depth * BS + slot, tok), \
                f"cached block {block.block_id} does not hold its tokens"


def run(s: Scheduler, rs, k: int, seed: int, refs: dict[str, list[int]], arrivals=None):
    runner, rng = SpecRunner(), np.random.default_rng(seed)
    s.spec_stats = SpecDecodeStats()
    arrivals = arrivals or {}
    for r in rs:
        if r.request_id not in arrivals:
            s.add_request(r)
    step_no = 0
    while s.has_unfinished_requests() or arrivals:
        for rid in [rid for rid, at in arrivals.items() if at <= step_no]:
            s.add_request(next(r for r in rs if r.request_id == rid))
            del arrivals[rid]
        propose(s, rng, k, refs)
        so = s.schedule()
        assert so.total_num_scheduled_tokens <= s.config.max_num_batched_tokens
        s.update_from_output(so, runner.execute(so))
        s.check_integrity()
        check_cached_blocks(s, runner)
        step_no += 1
        assert step_no < 3000
    assert s.kv_cache_manager.num_free_blocks == s.num_gpu_blocks
    return s.spec_stats


@pytest.mark.parametrize("num_blocks, budget, caching", [(64, 64, True), (64, 8, True), (14, 64, True),
                                                         (14, 10, False)])
def test_outputs_equal_plain_decoding(num_blocks, budget, caching):
    """Chunked prefill (small budgets), preemption (few blocks), prefix caching, max_tokens ending
    mid-proposal (max_tokens not a multiple of anything), requests arriving while others run."""
    s = make(num_blocks=num_blocks, budget=budget, caching=caching)
    ps = prompts(6, 9)
    ps[3] = ps[0][:8] + [5]  # shares two blocks with request 0: prefix-cache hits on verified blocks
    rs = [req(str(i), p, max_tokens=7 + 3 * i) for i, p in enumerate(ps)]
    refs = {r.request_id: reference(r.prompt_token_ids, r.max_tokens) for r in rs}
    stats = run(s, rs, k=3, seed=num_blocks + budget, refs=refs, arrivals={"3": 6, "5": 9})
    for r in rs:
        assert r.output_token_ids == refs[r.request_id], r
    assert stats.num_accepted_tokens > 10 and stats.num_draft_tokens > stats.num_accepted_tokens
    assert sum(stats.accepted_per_position) == stats.num_accepted_tokens
    assert stats.accepted_per_position == sorted(stats.accepted_per_position, reverse=True)


def test_accepted_tokens_are_not_computed_again():
    """A fully accepted proposal of k tokens costs one step of k + 1 tokens; the next step computes
    only the bonus token and the next proposal."""
    s = make(num_blocks=64, budget=64)
    r = req("a", prompts(1, 9)[0], max_tokens=20)
    ref = reference(r.prompt_token_ids, 20)
    runner = SpecRunner()
    s.add_request(r)
    so = s.schedule()
    s.update_from_output(so, runner.execute(so))
    while not r.is_finished():
        n = r.num_output_tokens
        s.set_proposals({"a": ref[n: n + 4]})
        so = s.schedule()
        assert so.num_scheduled_tokens == [1 + len(so.spec_token_ids.get("a", []))]
        s.update_from_output(so, runner.execute(so))
        assert r.output_token_ids == ref[: r.num_output_tokens]
        if not r.is_finished():
            assert r.num_output_tokens == n + 1 + len(ref[n: n + 4])
            assert r.num_computed_tokens == r.num_tokens - 1
    assert r.output_token_ids == ref


def test_proposals_are_cut_by_the_budget_and_never_preempt():
    s = make(num_blocks=64, budget=6)
    a, b = req("a", [1, 2, 3], max_tokens=30), req("b", [4, 5, 6], max_tokens=30)
    runner = SpecRunner()
    for r in (a, b):
        s.add_request(r)
    so = s.schedule()
    s.update_from_output(so, runner.execute(so))
    s.set_proposals({"a": [7, 7, 7, 7], "b": [8, 8, 8, 8]})
    so = s.schedule()
    # Both decodes first (2 tokens), then a's proposal takes the remaining 4; none is left for b's.
    assert so.num_scheduled_tokens == [5, 1] and so.spec_token_ids == {"a": [7, 7, 7, 7]}
    s.update_from_output(so, runner.execute(so))
    s.check_integrity()
    # Proposals are for one schedule() only.
    so = s.schedule()
    assert so.spec_token_ids == {} and so.num_scheduled_tokens == [1, 1]
