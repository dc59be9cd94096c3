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
from vllm_engine.worker.model_runner import ModelRunner

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
                                 _prompt_logprob_rows=ModelRunner._prompt_logprob_rows)
    out = ModelRunner._prepare_inputs(stub, sched)
    tokens, positions, slots, sample_rows = reference(sched)
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
