"""KV cache groups (Gemma 2/3: sliding-window and full-attention layers) in the scheduler, with no model.

A simulated runner keeps one KV store for the whole pool, (block, slot) -> (group, position, token):
groups share the block ids, so a block handed to two groups at once, a wrong table, a missed copy or
swap, or a block freed while its window still needs it makes some group read a wrong entry. Each
group's 'layer' reads the tokens of its window (all of them for full attention) through its own
table, and the sampled token depends on what every group read; the outputs are compared with a
plain loop over the token lists.
"""

from __future__ import annotations

import pickle
from typing import Optional

import numpy as np
import pytest

from tests.core.test_scheduler import next_token, prompts, req
from vllm_engine.config import CacheConfig, SchedulerConfig
from vllm_engine.core.hybrid_kv_cache_manager import HybridKVCacheManager
from vllm_engine.core.kv_cache_groups import KVCacheGroup, layer_group_slots, make_kv_cache_groups
from vllm_engine.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_engine.core.scheduler import Scheduler
from vllm_engine.engine.request import Request
from vllm_engine.worker.block_tables import GroupedHostBlockTables
from vllm_engine.worker.request_states import RequestStates, append_placeholders, fill_placeholders

BS = 4


def hybrid_next_token(tokens: list[int], windows: tuple[Optional[int], ...], salt: int = 0) -> int:
    """The 'model': every group reads its window of the sequence (None: all of it)."""
    seen: list[int] = []
    for w in windows:
        seen.extend(tokens[-w:] if w else tokens)
        seen.append(-7)
    return next_token(seen, salt)


def reference(prompt: list[int], max_tokens: int, windows: tuple[Optional[int], ...], salt: int = 0) -> list[int]:
    out: list[int] = []
    while len(out) < max_tokens:
        out.append(hybrid_next_token(prompt + out, windows, salt))
    return out


class HybridFakeRunner:
    """Carries out swaps and copies on one KV store for all groups, writes each step's tokens through
    every group's table, samples from what each group reads back through its table."""

    def __init__(self, windows: tuple[Optional[int], ...]) -> None:
        self.windows = windows
        self.gpu: dict[tuple[int, int], tuple[int, int, int]] = {}  # (block, slot) -> (group, position, token)
        self.cpu: dict[tuple[int, int], tuple[int, int, int]] = {}
        self.states = RequestStates(GroupedHostBlockTables(len(windows), rows=2))

    def _move(self, src: dict, dst: dict, pairs: list[tuple[int, int]]) -> None:
        for a, b in pairs:
            for s in range(BS):
                dst.pop((b, s), None)
                if (a, s) in src:
                    dst[(b, s)] = src[(a, s)]

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        msg = pickle.loads(pickle.dumps(so.execute_model_request))
        states = self.states.update(msg)
        rows, lens = self.states.host_tables.gather(msg.req_ids)
        tables = [tuple(rows[g, i, :n].tolist() for g in range(len(self.windows))) for i, n in enumerate(lens)]
        assert tables == [tuple(t) for t in so.block_tables], "a kept row differs from the scheduler's tables"
        assert not rows[:, np.arange(rows.shape[2]) >= lens[:, None]].any(), "ids past a table's end"
        self._move(self.gpu, self.cpu, so.blocks_to_swap_out)
        self._move(self.cpu, self.gpu, so.blocks_to_swap_in)
        self._move(self.gpu, self.gpu, so.blocks_to_copy)
        written: set[tuple[int, int]] = set()
        for r, n, bt in zip(so.scheduled_requests, so.num_scheduled_tokens, tables):
            for p in range(r.num_computed_tokens, r.num_computed_tokens + n):
                for g in range(len(self.windows)):
                    slot = (bt[g][p // BS], p % BS)
                    assert slot not in written, "two writes into one KV slot in one step"
                    written.add(slot)
                    self.gpu[slot] = (g, p, r.all_token_ids[p])
        sampled = [self._sample(r, n, bt) for r, n, bt in zip(so.scheduled_requests, so.num_scheduled_tokens, tables)]
        done = [(st, t) for st, t in zip(states, sampled) if t is not None]
        fill_placeholders([st for st, _ in done], append_placeholders([st for st, _ in done]), [t for _, t in done])
        return ModelRunnerOutput(req_ids=[r.request_id for r in so.scheduled_requests],
                                 sampled_token_ids=[[t] if t is not None else [] for t in sampled])

    def _sample(self, r: Request, n: int, bt: tuple[list[int], ...]) -> Optional[int]:
        end = r.num_computed_tokens + n
        if end < r.num_tokens:
            return None
        seen: list[int] = []
        for g, w in enumerate(self.windows):
            for p in range(max(0, end - w) if w else 0, end):
                group, pos, tok = self.gpu.get((bt[g][p // BS], p % BS), (-1, -1, -1))
                seen.append(tok if (group, pos) == (g, p) else -1)
            seen.append(-7)
        return next_token(seen, r.sample_index)


def make(windows, num_blocks=64, budget=16, mode="recompute", caching=True, num_cpu_blocks=0) -> Scheduler:
    groups = tuple(KVCacheGroup((g,), w) for g, w in enumerate(windows))
    sc = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=1024, preemption_mode=mode)
    cache = CacheConfig(block_size=BS, enable_prefix_caching=caching, kv_cache_groups=groups)
    return Scheduler(sc, cache, num_blocks, num_cpu_blocks)


def step(s: Scheduler, runner: HybridFakeRunner) -> SchedulerOutput:
    so = s.schedule()
    kv = s.kv_cache_manager
    for r in so.scheduled_requests:
        for table in kv.req_blocks[r.request_id]:
            assert all(b.ref_cnt == 1 for b in table[r.num_computed_tokens // BS:]), "a write into a shared block"
    s.update_from_output(so, runner.execute(so))
    s.check_integrity()
    return so


def test_groups_of_equal_size_full_attention_first():
    gemma2 = make_kv_cache_groups([8, None] * 3)
    assert [(g.layer_ids, g.sliding_window) for g in gemma2] == [((1, 3, 5), None), ((0, 2, 4), 8)]
    gemma3 = make_kv_cache_groups([16] * 5 + [None] + [16] * 5 + [None] + [16, 16])
    assert [g.layer_ids for g in gemma3] == [(5, 11), (0, 1), (2, 3), (4, 6), (7, 8), (9, 10), (12, 13)]
    assert layer_group_slots(gemma3, 14)[6] == (3, 1) and layer_group_slots(gemma3, 14)[11] == (0, 1)
    short = make_kv_cache_groups([None, None, 4, 4, 4])  # the last sliding group has one layer
    assert [g.layer_ids for g in short] == [(0, 1), (2, 3), (4,)]
    assert make_kv_cache_groups([None] * 4) == (KVCacheGroup((0, 1, 2, 3), None),)
    with pytest.raises(ValueError, match="in no KV cache group"):
        layer_group_slots(gemma2, 7)


@pytest.mark.parametrize("windows", [(None, 10, 10), (None, 6, 13)])
@pytest.mark.parametrize("mode, num_blocks", [("recompute", 96), ("recompute", 40), ("swap", 40)])
def test_outputs_and_bounded_sliding_groups(windows, mode, num_blocks):
    """Chunked prompts, an n = 2 fork, preemption (recompute or swap) with few blocks: every request
    gets the plain loop's tokens; a sliding group never holds more than its window and a step's new
    tokens, while the full group holds the whole sequence; nothing leaks."""
    s, runner = make(windows, num_blocks=num_blocks, mode=mode, num_cpu_blocks=128), HybridFakeRunner(windows)
    rs = [req(str(i), p, max_tokens=30) for i, p in enumerate(prompts(4, 26))]
    rs.append(req("fork", prompts(1, 12, seed=3)[0], max_tokens=20, n=2))
    rs.append(Request("fork#1", rs[-1].prompt_token_ids, rs[-1].sampling_params, max_tokens=20,
                      sample_index=1, fork_from=rs[-1]))
    for r in rs:
        s.add_request(r)
    kv = s.kv_cache_manager
    peak_full = 0
    for _ in range(3000):
        if not s.has_unfinished_requests():
            break
        step(s, runner)
        for r in s.running:
            tables = kv.req_blocks[r.request_id]
            for g, w in enumerate(windows):
                held = sum(1 for b in tables[g][kv.num_window_freed[r.request_id][g]:])
                if w is not None:
                    assert held <= -(-(w + 3) // BS) + -(-16 // BS) + 1, (r.request_id, g, held)
            peak_full = max(peak_full, len(tables[0]))
    assert not s.has_unfinished_requests()
    for r in rs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens, windows, r.sample_index), r.request_id
    assert kv.num_free_blocks == s.num_gpu_blocks and peak_full >= -(-(26 + 29) // BS)
    if num_blocks == 40:
        assert s.num_preemptions_total > 0
    if mode == "swap":
        assert s.num_swaps_total > 0


def test_prefix_hit_needs_every_group():
    """A second request with the same prompt finds every full prompt block in the full group and the
    window's blocks in the sliding group (the ones before are NULL entries), and samples the same
    tokens; once the sliding group's blocks at the end of the prompt are evicted, the hit shrinks to
    a prefix whose window the sliding group still holds."""
    windows = (None, 6)
    s, runner = make(windows, num_blocks=64), HybridFakeRunner(windows)
    first = req("first", prompts(1, 26)[0], max_tokens=12)
    s.add_request(first)
    while s.has_unfinished_requests():
        step(s, runner)
    again = req("again", first.prompt_token_ids, max_tokens=12)
    s.add_request(again)
    step(s, runner)
    assert again.num_cached_tokens == 24
    kv = s.kv_cache_manager
    assert kv.get_block_ids(again)[1][:4] == [0, 0, 0, 0] and kv.num_window_freed["again"] == [0, 4]
    while s.has_unfinished_requests():
        step(s, runner)
    assert again.output_token_ids == first.output_token_ids == reference(first.prompt_token_ids, 12, windows)
    # Evict the sliding group's block 5 (tokens 20..23): the hit falls back to 20 tokens if its window
    # (tokens 15..19: blocks 3 and 4) is still cached, else further.
    kv.pool._evict(kv.pool.get_cached_block((1, again.block_hashes[5])))
    third = req("third", first.prompt_token_ids, max_tokens=12)
    s.add_request(third)
    step(s, runner)
    assert third.num_cached_tokens == 20
    while s.has_unfinished_requests():
        step(s, runner)
    assert third.output_token_ids == first.output_token_ids


def test_allocation_is_all_or_nothing():
    """A request whose groups do not all fit gets nothing: the pool is untouched."""
    kv = HybridKVCacheManager(num_gpu_blocks=5, block_size=BS, enable_caching=False, sliding_windows=(None, 8))
    r = req("r", list(range(12)), max_tokens=4)
    assert kv.allocate_slots(r, 12, kv.get_computed_blocks(r)[0]) is None  # 3 blocks x 2 groups > 5
    kv.check_integrity()
    assert kv.num_free_blocks == 5 and "r" not in kv.req_blocks
    assert kv.allocate_slots(r, 8, kv.get_computed_blocks(r)[0]) is not None
    assert kv.num_free_blocks == 1 and [len(t) for t in kv.get_block_ids(r)] == [2, 2]
    kv.check_integrity()


def test_a_sibling_that_moved_on_is_not_forked():
    """n = 2 while blocks are scarce: the second sample waits while its sibling decodes past the window;
    then it computes its prompt itself (the sibling freed the blocks it would share) and still gets
    the plain loop's tokens."""
    windows = (None, 6)
    s, runner = make(windows, num_blocks=64), HybridFakeRunner(windows)
    parent = req("p", prompts(1, 10, seed=5)[0], max_tokens=24, n=2)
    child = Request("p#1", parent.prompt_token_ids, parent.sampling_params, max_tokens=24, sample_index=1,
                    fork_from=parent)
    s.add_request(parent)
    for _ in range(12):
        step(s, runner)
    kv = s.kv_cache_manager
    assert not kv.can_fork(parent, parent.num_prompt_tokens - 1)
    s.add_request(child)
    while s.has_unfinished_requests():
        step(s, runner)
    assert child.output_token_ids == reference(child.prompt_token_ids, 24, windows, 1)
    assert parent.output_token_ids == reference(parent.prompt_token_ids, 24, windows, 0)


def test_one_window_sibling_that_moved_on_is_not_forked():
    """The same fork rule with one shared window (Mistral v0.1's KVCacheManager): sharing the blocks
    the sibling freed would make the second sample read other requests' K/V."""
    from tests.core.test_scheduler import FakeRunner
    from tests.core.test_scheduler import make as make_one_group
    from tests.core.test_scheduler import reference as one_window_reference
    from tests.core.test_scheduler import step as one_group_step

    s, runner = make_one_group(num_blocks=64, budget=16, sliding_window=6), FakeRunner(window=6)
    parent = req("p", prompts(1, 10, seed=5)[0], max_tokens=24, n=2)
    child = Request("p#1", parent.prompt_token_ids, parent.sampling_params, max_tokens=24, sample_index=1,
                    fork_from=parent)
    s.add_request(parent)
    for _ in range(12):
        one_group_step(s, runner)
    assert not s.kv_cache_manager.can_fork(parent, parent.num_prompt_tokens - 1)
    s.add_request(child)
    while s.has_unfinished_requests():
        one_group_step(s, runner)
    assert child.output_token_ids == one_window_reference(child.prompt_token_ids, 24, 1, 6)


def test_a_prompt_no_group_layout_can_hold_is_refused_at_once():
    """Admission counts every group: a full group holds the whole prompt, a sliding group its window."""
    s = make((None, 8), num_blocks=10)
    kv = s.kv_cache_manager
    assert kv.min_blocks_needed(33) == 9 + 2  # cdiv(33, 4) in the full group, the window's 2 blocks
    s.add_request(req("fits", list(range(20)), max_tokens=2))  # 6 + 2 blocks
    with pytest.raises(ValueError, match="needs 11 KV cache blocks"):
        s.add_request(req("too long", list(range(32)), max_tokens=2))
