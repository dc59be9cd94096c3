"""The runner's verifying step (spec_decode/verify.py): each row is verified against the target
as plain decoding would have processed it at that point, the proposals before it counted as
output (penalties, min_tokens); the flat rows and token ids it builds."""

from __future__ import annotations

import numpy as np
import torch

from vllm_engine.core.sched_output import ModelRunnerOutput
from vllm_engine.sampling_params import SamplingParams
from vllm_engine.spec_decode.verify import input_token_ids, verify, verify_rows
from vllm_engine.worker.request_states import CachedRequestState

V, EOS = 12, 11
CPU = torch.device("cpu")


def state(rid, prompt, output, params):
    return CachedRequestState(rid, prompt, params, 0, frozenset({EOS}), len(prompt) + len(output) - 1,
                              token_ids=prompt + output, output_token_ids=list(output))


def rows(*best):
    """Logits rows: row i puts its largest values on the tokens of best[i] (a dict token -> logit)."""
    out = torch.zeros(len(best), V)
    for i, d in enumerate(best):
        for t, v in d.items():
            out[i, t] = v
    return out


def run(states, drafts, logits):
    spec = {s.req_id: d for s, d in zip(states, drafts) if d}
    step = verify(logits, states, list(range(len(states))), [len(d) for d in drafts], spec, {}, CPU)
    out = ModelRunnerOutput(req_ids=[s.req_id for s in states], sampled_token_ids=[[] for _ in states],
                            logprobs=[[] for _ in states])
    step.write(out)
    return out.sampled_token_ids


def test_penalties_count_the_proposals_before_each_row():
    # Row 1 prefers token 4 a little; 4 is proposal 1, so the repetition penalty (as plain decoding
    # would apply it after emitting 4) makes 5 the target's token there: proposal 2 (4) is rejected.
    params = SamplingParams(temperature=0.0, repetition_penalty=10.0)
    s = state("a", [1, 2], [3], params)
    assert run([s], [[4, 4]], rows({4: 5.0}, {4: 2.0, 5: 1.5}, {6: 1.0})) == [[4, 5]]
    assert s.token_ids[-2:] == [4, 5] and s.output_token_ids == [3, 4, 5]
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    s = state("b", [1, 2], [3], params)
    assert run([s], [[4, 4]], rows({4: 5.0}, {4: 2.0, 5: 1.5}, {6: 1.0})) == [[4, 5]]


def test_min_tokens_counts_the_proposals_before_each_row():
    # min_tokens=2 with no output yet: EOS is banned at rows 0 and 1, allowed at row 2.
    params = SamplingParams(temperature=0.0, min_tokens=2)
    s = state("a", [1, 2], [], params)
    logits = rows({7: 3.0, EOS: 5.0}, {8: 3.0, EOS: 5.0}, {9: 3.0, EOS: 5.0})
    assert run([s], [[7, 8]], logits) == [[7, 8, EOS]]


def test_requests_without_proposals_in_the_same_step():
    params = SamplingParams(temperature=0.0)
    a, b = state("a", [1], [2], params), state("b", [3], [4], params)
    logits = rows({5: 1.0}, {6: 1.0}, {7: 1.0}, {8: 1.0})  # a: 2 proposals (3 rows), b: none (1 row)
    assert run([a, b], [[5, 9], []], logits) == [[5, 6], [8]]


def test_rows_and_input_tokens():
    assert verify_rows(np.array([4, 9]), np.array([2, 0])).tolist() == [2, 3, 4, 9]
    p = SamplingParams()
    a, b = state("a", [1, 2, 3], [4], p), state("b", [5, 6, 7, 8, 9], [], p)
    b.num_computed_tokens = 0
    # a: its last token and 2 proposals; b: the first 3 prompt tokens (a chunk, no proposals).
    ids = input_token_ids([a, b], {"a": [10, 11]}, np.array([3, 0]), np.array([0, 3, 6]), 6)
    assert ids.tolist() == [4, 10, 11, 5, 6, 7]


def _reference_greedy(logits: torch.Tensor, drafts: list[list[int]]) -> list[list[int]]:
    """Greedy verification from float64 argmaxes, request by request (an independent loop)."""
    best = logits.double().argmax(dim=-1).tolist()
    out, row = [], 0
    for d in drafts:
        tokens = []
        for i in range(len(d) + 1):
            tokens.append(best[row + i])
            if i == len(d) or d[i] != best[row + i]:
                break
        out.append(tokens)
        row += len(d) + 1
    return out


def test_greedy_path_equals_argmax_decoding_and_the_rejection_sampler():
    """All-greedy steps take the host-side greedy path: the tokens of a float64 argmax loop, the same
    as the rejection sampler's (the path a logprobs request takes), over random batches whose
    proposals are partly the argmaxes; its device accepted counts (EAGLE) match too."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        batch = 1 + trial % 5
        k = [int(x) for x in torch.randint(0, 5, (batch,), generator=gen)]
        logits = torch.randn(sum(k) + batch, V, generator=gen)
        best = logits.argmax(dim=-1).tolist()
        drafts, row = [], 0
        for kb in k:
            keep = int(torch.randint(0, kb + 1, (1,), generator=gen))  # this many proposals are the argmaxes
            drafts.append([best[row + i] if i < keep else (best[row + i] + 1) % V for i in range(kb)])
            row += kb + 1
        greedy = SamplingParams(temperature=0.0)
        states = [state(f"r{b}", [1, 2], [3], greedy) for b in range(batch)]
        spec = {s.req_id: d for s, d in zip(states, drafts) if d}
        step = verify(logits, states, list(range(batch)), k, spec, {}, CPU)
        assert step.greedy_ids is not None and step.token_ids is None  # the greedy path was taken
        counts = step.accepted_counts().tolist()
        out = ModelRunnerOutput(req_ids=[s.req_id for s in states], sampled_token_ids=[[] for _ in states],
                                logprobs=[[] for _ in states])
        step.write(out)
        want = _reference_greedy(logits, drafts)
        assert out.sampled_token_ids == want
        assert counts == [len(t) - 1 for t in want]
        # The same requests asking for logprobs go through the rejection sampler: the same tokens.
        with_lp = SamplingParams(temperature=0.0, logprobs=1)
        states = [state(f"r{b}", [1, 2], [3], with_lp) for b in range(batch)]
        step = verify(logits, states, list(range(batch)), k, spec, {}, CPU)
        assert step.token_ids is not None
        assert step.accepted_counts().tolist() == counts
        out = ModelRunnerOutput(req_ids=[s.req_id for s in states], sampled_token_ids=[[] for _ in states],
                                logprobs=[[] for _ in states])
        step.write(out)
        assert out.sampled_token_ids == want
