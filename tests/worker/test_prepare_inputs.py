"""ModelRunner._prepare_inputs against a per-sequence reference: token ids, positions, block tables,
slot mapping and the sampled rows, for decode-only steps (the vectorized fast path) and mixed ones."""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch

from vllm_engine.attention.backend import block_table_width
from vllm_engine.core.sched_output import SchedulerOutput
from vllm_engine.engine.request import Request
from vllm_engine.sampling_params import SamplingParams
from vllm_engine.worker.block_tables import HostBlockTables
from vllm_engine.worker.model_runner import ModelRunner
from vllm_engine.worker.staging import HostStaging

BS = 16


def make_step(counts: list[int], seed: int, partial: set[int] = frozenset()):
    """Requests with random lengths; request i computes counts[i] tokens ending at its last token
    (or one token short of it when i is in ``partial``: a prompt chunk that is not sampled)."""
    rng = random.Random(seed)
    reqs, tables, nb = [], [], 0
    for i, c in enumerate(counts):
        length = rng.randint(c + 1, c + 200)
        r = Request(str(i), [rng.randrange(1000) for _ in range(length)], SamplingParams(max_tokens=4))
        end = length - 1 if i in partial else length
        r.num_computed_tokens = end - c
        reqs.append(r)
        n = (length + BS - 1) // BS
        ids = rng.sample(range(nb, nb + 3 * n), n)  # block ids out of order, as after frees
        tables.append(ids)
        nb += 3 * n
    return SchedulerOutput(scheduled_requests=reqs, num_scheduled_tokens=counts, block_tables=tables,
                           total_num_scheduled_tokens=sum(counts))


def reference(sched: SchedulerOutput):
    tokens, positions, slots, sample_rows = [], [], [], []
    row = 0
    for r, c, bt in zip(sched.scheduled_requests, sched.num_scheduled_tokens, sched.block_tables):
        for p in range(r.num_computed_tokens, r.num_computed_tokens + c):
            tokens.append(r.all_token_ids[p])
            positions.append(p)
            slots.append(bt[p // BS] * BS + p % BS)
        row += c
        if r.num_computed_tokens + c == r.num_tokens:
            sample_rows.append(row - 1)
    return tokens, positions, slots, sample_rows


@pytest.mark.parametrize("counts,partial", [([1] * 37, set()), ([5, 1, 1, 40, 1, 3], {3}), ([1], set()),
                                            ([7, 9], {0, 1})])
def test_prepare_inputs_matches_a_per_sequence_reference(counts, partial):
    sched = make_step(counts, seed=len(counts), partial=partial)
    stub = types.SimpleNamespace(block_size=BS, device=torch.device("cpu"), _last_sample_row={}, _last_sampled=None,
                                 _prompt_logprob_rows=ModelRunner._prompt_logprob_rows, staging=HostStaging("cpu"),
                                 host_tables=HostBlockTables())
    out = ModelRunner._prepare_inputs(stub, sched)
    tokens, positions, slots, sample_rows = reference(sched)
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
    assert bt.shape == (len(counts), block_table_width(max(map(len, sched.block_tables))))
    for i, table in enumerate(sched.block_tables):
        assert bt[i, :len(table)].tolist() == table and not bt[i, len(table):].any()
    assert meta.seq_lens.tolist() == [r.num_computed_tokens + c for r, c in zip(sched.scheduled_requests, counts)]
    assert np.array_equal(meta.query_start_loc.numpy(), np.concatenate([[0], np.cumsum(counts)]))
    if len(counts) > 1:
        lens = meta.seq_lens.numpy()
        assert sorted(meta.decode_order.tolist(), key=lambda i: (-lens[i], i)) == meta.decode_order.tolist()
        assert sorted(meta.decode_order.tolist()) == list(range(len(counts)))


def test_placeholder_tokens_come_from_the_previous_launch_on_the_device():
    """Async scheduling: a decode whose input token is still a placeholder takes it from the previous
    step's sampled-token tensor (by that step's sample row), after the one staged copy."""
    from vllm_engine.engine.request import PLACEHOLDER_TOKEN_ID

    sched = make_step([1, 1, 1], seed=3)
    for r in sched.scheduled_requests[:2]:
        r.all_token_ids[r.num_computed_tokens] = PLACEHOLDER_TOKEN_ID
    stub = types.SimpleNamespace(block_size=BS, device=torch.device("cpu"), _prompt_logprob_rows=None,
                                 _last_sample_row={"0": 2, "1": 0}, _last_sampled=torch.tensor([11, 22, 33]),
                                 staging=HostStaging("cpu"), host_tables=HostBlockTables())
    out = ModelRunner._prepare_inputs(stub, sched)
    third = sched.scheduled_requests[2]
    assert out.input_ids.tolist() == [33, 11, third.all_token_ids[third.num_computed_tokens]]


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and the copy need CUDA")
def test_host_staging_on_cuda_is_one_copy_per_step():
    st = HostStaging("cuda", slots=2)
    steps = [[np.arange(i, i + 7, dtype=np.int64), np.full((3, 4), i, dtype=np.int32)] for i in range(5)]
    for arrays in steps:
        got = st.stage(*arrays)
        assert all(t.is_cuda for t in got)
        assert [t.cpu().numpy().tolist() for t in got] == [a.tolist() for a in arrays]
    assert st.num_copies == 5
