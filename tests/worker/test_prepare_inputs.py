"""ModelRunner._prepare_inputs against a per-sequence reference: token ids, positions, block tables,
slot mapping and the sampled rows, for decode-only steps (the vectorized fast path) and mixed ones."""

from __future__ import annotations

import random
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from vllm_engine.attention.backend import block_table_width
from vllm_engine.core.sched_output import CachedRequestData, ExecuteModelRequest, NewRequestData
from vllm_engine.sampling_params import SamplingParams
from vllm_engine.worker.block_tables import GroupedHostBlockTables, HostBlockTables
from vllm_engine.worker.model_runner import ModelRunner
from vllm_engine.worker.request_states import (
    CachedRequestState, RequestStates, append_placeholders, fill_placeholders)
from vllm_engine.worker.staging import HostStaging

BS = 16


@dataclass
class Step:
    msg: ExecuteModelRequest
    states: list[CachedRequestState]
    tables: list[list[int]]
    runner: types.SimpleNamespace  # the attributes of ModelRunner that _prepare_inputs reads


def make_step(counts: list[int], seed: int, partial: set[int] = frozenset(), num_groups: int = 1) -> Step:
    """Requests with random lengths, sent to the worker as new; request i computes counts[i] tokens
    ending at its last token (or one short of it when i is in ``partial``: a prompt chunk, not sampled).
    ``num_groups`` > 1: KV cache groups, a table per group per request (``tables[i]`` is then a tuple)."""
    rng = random.Random(seed)
    new, tables, nb = [], [], 0
    for i, c in enumerate(counts):
        length = rng.randint(c + 1, c + 200)
        end = length - 1 if i in partial else length
        n = (length + BS - 1) // BS
        per_group = []
        for _ in range(num_groups):
            per_group.append(rng.sample(range(nb, nb + 3 * n), n))  # block ids out of order, as after frees
            nb += 3 * n
        ids = per_group[0] if num_groups == 1 else tuple(per_group)
        tables.append(ids)
        new.append(NewRequestData(str(i), [rng.randrange(1000) for _ in range(length)], [],
                                  SamplingParams(max_tokens=4), 0, frozenset(), ids, end - c))
    msg = ExecuteModelRequest(req_ids=[d.req_id for d in new], num_scheduled_tokens=counts,
                              total_num_scheduled_tokens=sum(counts), new_requests=new)
    requests = RequestStates(HostBlockTables() if num_groups == 1 else GroupedHostBlockTables(num_groups))
    states = requests.update(msg)
    runner = types.SimpleNamespace(block_size=BS, device=torch.device("cpu"), _last_sample_row={}, _last_sampled=None,
                                   _prompt_logprob_rows=ModelRunner._prompt_logprob_rows, staging=HostStaging("cpu"),
                                   requests=requests, num_kv_groups=num_groups)
    return Step(msg, states, tables, runner)


def reference(step: Step):
    tokens, positions, slots, sample_rows = [], [], [], []
    row = 0
    for r, c, bt in zip(step.states, step.msg.num_scheduled_tokens, step.tables):
        for p in range(r.num_computed_tokens, r.num_computed_tokens + c):
            tokens.append(r.token_ids[p])
            positions.append(p)
            slots.append(bt[p // BS] * BS + p % BS)
        row += c
        if r.num_computed_tokens + c == r.num_tokens:
            sample_rows.append(row - 1)
    return tokens, positions, slots, sample_rows


@pytest.mark.parametrize("counts,partial", [([1] * 37, set()), ([5, 1, 1, 40, 1, 3], {3}), ([1], set()),
                                            ([7, 9], {0, 1})])
def test_prepare_inputs_matches_a_per_sequence_reference(counts, partial):
    step = make_step(counts, seed=len(counts), partial=partial)
    out = ModelRunner._prepare_inputs(step.runner, step.msg, step.states)
    tokens, positions, slots, sample_rows = reference(step)
    assert out.input_ids.dtype == out.positions.dtype == out.attn_metadata.slot_mapping.dtype == torch.int64
    assert out.attn_metadata.block_tables.dtype == out.attn_metadata.seq_lens.dtype == torch.int32
    assert out.sample_rows_dev.tolist() == sample_rows
    assert out.input_ids.tolist() == tokens
    assert out.positions.tolist() == positions
    meta = out.attn_metadata
    assert meta.slot_mapping.tolist() == slots
    assert out.sample_rows == sample_rows
    assert out.sample_req_indices == [i for i in range(len(counts)) if i not in partial]
    bt = meta.block_tables.numpy()
    assert bt.shape == (len(counts), block_table_width(max(map(len, step.tables))))
    for i, table in enumerate(step.tables):
        assert bt[i, :len(table)].tolist() == table and not bt[i, len(table):].any()
    assert meta.seq_lens.tolist() == [r.num_computed_tokens + c for r, c in zip(step.states, counts)]
    assert np.array_equal(meta.query_start_loc.numpy(), np.concatenate([[0], np.cumsum(counts)]))
    if len(counts) > 1:
        lens = meta.seq_lens.numpy()
        assert sorted(meta.decode_order.tolist(), key=lambda i: (-lens[i], i)) == meta.decode_order.tolist()
        assert sorted(meta.decode_order.tolist()) == list(range(len(counts)))


def test_kv_cache_groups_get_their_own_tables_and_slots():
    """Three KV cache groups (Gemma 3's kinds of layers): group g's metadata holds each request's
    group-g table and the slots of its new tokens in that table; the top-level metadata is group 0's."""
    counts = [5, 1, 1, 40, 1]
    step = make_step(counts, seed=5, partial={3}, num_groups=3)
    meta = ModelRunner._prepare_inputs(step.runner, step.msg, step.states).attn_metadata
    assert len(meta.groups) == 3
    for g, group in enumerate(meta.groups):
        slots = []
        for r, c, tables in zip(step.states, counts, step.tables):
            positions = range(r.num_computed_tokens, r.num_computed_tokens + c)
            slots.extend(tables[g][p // BS] * BS + p % BS for p in positions)
        assert group.slot_mapping.tolist() == slots
        bt = group.block_tables.numpy()
        for i, tables in enumerate(step.tables):
            assert bt[i, :len(tables[g])].tolist() == tables[g] and not bt[i, len(tables[g]):].any()
        assert group.seq_lens is meta.seq_lens and group.query_start_loc is meta.query_start_loc
    assert meta.slot_mapping.tolist() == meta.groups[0].slot_mapping.tolist()
    assert torch.equal(meta.block_tables, meta.groups[0].block_tables)


def test_placeholder_tokens_come_from_the_previous_launch_on_the_device():
    """Async scheduling: a decode whose input token is still a placeholder (the worker sampled it, the
    host has not read it yet) takes it from the previous step's sampled-token tensor, by that step's
    sample row, after the one staged copy; collect() then writes the value over the placeholder."""
    step = make_step([1, 1, 1], seed=3)
    for r in step.states[:2]:  # their last token was sampled by a launch not yet collected
        r.token_ids.pop()
    append_placeholders(step.states[:2])
    step.runner._last_sample_row, step.runner._last_sampled = {"0": 2, "1": 0}, torch.tensor([11, 22, 33])
    out = ModelRunner._prepare_inputs(step.runner, step.msg, step.states)
    third = step.states[2]
    assert out.input_ids.tolist() == [33, 11, third.token_ids[third.num_computed_tokens]]


def test_worker_states_follow_the_messages():
    """New requests once, then per-step changes: computed counts and (only when changed) whole tables;
    finished ones are dropped with their table rows."""
    step = make_step([3, 1], seed=5)
    requests = step.runner.requests
    a, b = step.states
    fill_placeholders([a], append_placeholders([a]), [77])
    assert a.output_token_ids == [77] and a.token_ids[-1] == 77
    cached = CachedRequestData(req_ids=["0", "1"], num_computed_tokens=[a.num_tokens - 1, 0],
                               block_ids=[None, [9, 8, 7]])
    msg = ExecuteModelRequest(req_ids=["1", "0"], num_scheduled_tokens=[1, 1], total_num_scheduled_tokens=2,
                              cached_requests=cached)
    states = requests.update(msg)
    assert states == [b, a] and a.num_computed_tokens == a.num_tokens - 1 and b.num_computed_tokens == 0
    rows, lens = requests.host_tables.gather(["0", "1"])
    assert rows[0, : lens[0]].tolist() == step.tables[0] and rows[1, : lens[1]].tolist() == [9, 8, 7]
    requests.update(ExecuteModelRequest(finished_req_ids={"0"}))
    assert list(requests.states) == ["1"] and "0" not in requests.host_tables._row_of


def test_host_staging_packs_arrays_into_one_buffer_and_reuses_its_slots():
    st = HostStaging("cpu", slots=2, initial_bytes=64)
    a = np.arange(5, dtype=np.int64)
    b = np.arange(6, dtype=np.int32).reshape(2, 3)
    c = np.array([True, False, True])
    e = np.empty(0, dtype=np.int64)
    ta, tb, tc, te = st.stage(a, b, c, e)
    assert ta.tolist() == a.tolist() and tb.tolist() == b.tolist() and tc.tolist() == c.tolist() and te.numel() == 0
    assert (ta.dtype, tb.dtype, tc.dtype, tb.shape) == (torch.int64, torch.int32, torch.bool, (2, 3))
    assert ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()  # one buffer
    assert tb.data_ptr() % 16 == 0 and tc.data_ptr() % 16 == 0
    big = np.arange(100, dtype=np.int64)  # 800 bytes: slot 1 grows past its 64
    (tbig,) = st.stage(big)
    assert tbig.tolist() == big.tolist()
    (again,) = st.stage(np.full(5, 7, dtype=np.int64))  # back to slot 0: the first step's views are reused
    assert again.data_ptr() == ta.data_ptr() and ta.tolist() == [7] * 5
    with pytest.raises(ValueError, match="slots"):
        HostStaging("cpu", slots=0)


def test_host_staging_fills_an_array_in_place_before_the_others():
    st = HostStaging("cpu", slots=2, initial_bytes=64)
    st.stage(np.full(64, 9, dtype=np.int64))  # slot 0 holds other values: the fill must write every element
    mask = np.arange(12, dtype=np.int32).reshape(3, 4) - 5

    def fill(view):
        assert view.shape == (3, 4) and view.dtype == np.int32
        view[:] = mask

    rows = np.array([0, 2, 5], dtype=np.int64)
    tm, tr = st.stage_filled((3, 4), np.int32, fill, rows)
    assert (tm.dtype, tm.shape) == (torch.int32, (3, 4)) and tm.tolist() == mask.tolist()
    assert tr.tolist() == rows.tolist() and tr.untyped_storage().data_ptr() == tm.untyped_storage().data_ptr()
    (empty, none) = st.stage_filled((0, 4), np.int32, lambda view: None, np.empty(0, dtype=np.int64))
    assert empty.shape == (0, 4) and none.numel() == 0

    def broken(view):
        raise RuntimeError("grammar")

    with pytest.raises(RuntimeError, match="grammar"):
        st.stage_filled((2, 2), np.int32, broken)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and the copy need CUDA")
def test_host_staging_on_cuda_is_one_copy_per_step():
    st = HostStaging("cuda", slots=2)
    steps = [[np.arange(i, i + 7, dtype=np.int64), np.full((3, 4), i, dtype=np.int32)] for i in range(5)]
    for arrays in steps:
        got = st.stage(*arrays)
        assert all(t.is_cuda for t in got)
        assert [t.cpu().numpy().tolist() for t in got] == [a.tolist() for a in arrays]
    filled = st.stage_filled((3, 4), np.int32, lambda view: view.fill(-3), steps[0][0])
    assert [t.cpu().tolist() for t in filled] == [[[-3] * 4] * 3, steps[0][0].tolist()]
    assert st.num_copies == 6
