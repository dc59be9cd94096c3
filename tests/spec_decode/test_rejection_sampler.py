"""Rejection sampler: greedy verification is plain argmax decoding, and sampled verification keeps
the target's processed distribution exactly.

The target is a Markov chain over a small vocabulary: the raw logits after token x are W[x]. A
"request" generates M tokens by repeated verification steps (proposals of k tokens each, random
ones: the proof of exactness holds for any proposal independent of the target's draws). The
distribution of the M tokens, over many seeded trials, is compared with the exact joint
distribution enumerated in float64 by an independent reference of every sampling transform
(chi-square over the cells, and total variation).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from vllm_engine.layers.sampler import SamplingMetadata
from vllm_engine.sampling_params import SamplingParams
from vllm_engine.spec_decode.rejection_sampler import DraftLayout, rejection_sample

CPU = torch.device("cpu")
V = 6  # vocabulary
M = 3  # tokens generated per trial
EOS = 5
PROMPT = [2, 4, 1]


def chain(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g, dtype=torch.float64) * 1.5


# ---- the independent reference (float64, from the definitions of docs/sampling.md) -------------------
def reference_probs(raw: np.ndarray, prompt: list[int], out: list[int], p: SamplingParams) -> np.ndarray:
    l = raw.astype(np.float64).copy()
    for t, b in (p.logit_bias or {}).items():
        l[t] += b
    if len(out) < p.min_tokens:
        for t in set(p.stop_token_ids or ()) | ({EOS} if not p.ignore_eos else set()):
            l[t] = -math.inf
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(out):
            l[t] = l[t] / p.repetition_penalty if l[t] > 0 else l[t] * p.repetition_penalty
    for t in set(out):
        l[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    if p.temperature < 1e-5:
        return np.eye(V)[int(np.argmax(l))]
    l = l / p.temperature
    if 0 < p.top_k < V:
        l[l < np.sort(l)[-p.top_k]] = -math.inf
    if p.top_p < 1.0:
        probs = np.exp(l - l.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        above = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])  # mass strictly above each token
        drop = order[above >= p.top_p]
        l[drop] = -math.inf
    if p.min_p > 0:
        probs = np.exp(l - l.max())
        l[probs < p.min_p] = -math.inf  # probs relative to the max: p_i / p_max
    probs = np.exp(l - l.max())
    return probs / probs.sum()


def reference_joint(W: torch.Tensor, p: SamplingParams) -> dict[tuple[int, ...], float]:
    raw = W.numpy()
    joint = {}
    for seq in itertools.product(range(V), repeat=M):
        prob, out, last = 1.0, [], PROMPT[-1]
        for t in seq:
            prob *= reference_probs(raw[last], PROMPT, out, p)[t]
            out.append(t)
            last = t
        joint[seq] = prob
    return joint


# ---- driving the sampler ---------------------------------------------------------------------------
def verify_step(W, params, outs, drafts, draft_probs=None, generators=None):
    """One verification of ``drafts[b]`` after ``outs[b]`` for every trial b; returns the tokens."""
    rows_params, rows_out, rows_logits = [], [], []
    for out, d in zip(outs, drafts):
        ctx = PROMPT + out
        for i in range(len(d) + 1):
            rows_params.append(params)
            rows_out.append(out + d[:i])
            rows_logits.append(W[(ctx + d[:i])[-1]])
    meta = SamplingMetadata.from_requests(
        params=rows_params, output_token_ids=rows_out, prompt_token_ids=[PROMPT] * len(rows_params),
        eos_token_ids=[{EOS}] * len(rows_params), generators={}, vocab_size=V, device=CPU)
    layout = DraftLayout.build([len(d) for d in drafts], CPU)
    flat = torch.tensor([t for d in drafts for t in d], dtype=torch.int64)
    res = rejection_sample(torch.stack(rows_logits).float(), meta, layout, flat, draft_probs, generators)
    return [[t for t in row if t >= 0] for row in res.token_ids.tolist()], res


def generate(W, params, num_trials, k, seed, Q=None):
    """M tokens per trial by verification steps; proposals: mostly a fixed function of the last
    token, else random (one-hot q), or drawn from the draft chain Q (passed as draft_probs)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    outs = [[] for _ in range(num_trials)]
    while True:
        active = [b for b in range(num_trials) if len(outs[b]) < M]
        if not active:
            break
        drafts, dprobs = [], []
        for b in active:
            kb = int(rng.integers(0, k + 1))
            last, d = (PROMPT + outs[b])[-1], []
            for _ in range(kb):
                if Q is None:  # skewed (a uniform proposal would hide a missing residual)
                    d.append(int((last * 5 + 1) % V) if rng.random() < 0.7 else int(rng.integers(0, V)))
                else:
                    dprobs.append(Q[last])
                    d.append(int(rng.choice(V, p=Q[last].numpy())))
                last = d[-1]
            drafts.append(d)
        draft_probs = torch.stack(dprobs).float() if dprobs else (None if Q is None else torch.zeros(0, V))
        new, _ = verify_step(W, params, [outs[b] for b in active], drafts, draft_probs)
        for b, toks in zip(active, new):
            outs[b].extend(toks)
    return [tuple(o[:M]) for o in outs]


def chi_square_pvalue(samples, joint) -> tuple[float, float]:
    """(p-value, total variation) of the samples' cell counts against the exact joint; cells
    expected below 5 are pooled into one."""
    n = len(samples)
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    obs, exp, pool_obs, pool_exp = [], [], 0, 0.0
    for cell, prob in joint.items():
        if prob * n >= 5:
            obs.append(counts.get(cell, 0))
            exp.append(prob * n)
        else:
            pool_obs += counts.get(cell, 0)
            pool_exp += prob * n
    if pool_exp > 0:
        obs.append(pool_obs)
        exp.append(pool_exp)
    exp = np.array(exp) * (n / sum(exp))
    tv = 0.5 * sum(abs(counts.get(c, 0) / n - p) for c, p in joint.items())
    return chisquare(obs, exp).pvalue, tv


SETTINGS = {
    "temperature": SamplingParams(temperature=1.0),
    "temperature_0.7_top_k": SamplingParams(temperature=0.7, top_k=3),
    "top_p_min_p": SamplingParams(temperature=1.3, top_p=0.8, min_p=0.1),
    "penalties": SamplingParams(temperature=0.9, repetition_penalty=1.4, frequency_penalty=0.6,
                                presence_penalty=0.3),
    "bias_min_tokens": SamplingParams(temperature=1.0, logit_bias={0: 1.5}, min_tokens=2, stop_token_ids=[3]),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_distribution_is_the_targets(name):
    params = SETTINGS[name]
    W = chain(seed=len(name))
    joint = reference_joint(W, params)
    samples = generate(W, params, num_trials=6000, k=3, seed=1)
    pvalue, tv = chi_square_pvalue(samples, joint)
    assert pvalue > 1e-3, (name, pvalue, tv)
    assert tv < 0.05, (name, tv)
    # The test has power: the raw (unprocessed) chain is rejected whenever processing changes it.
    raw = reference_joint(W, SamplingParams(temperature=1.0))
    if max(abs(raw[c] - joint[c]) for c in joint) > 0.02:
        assert chi_square_pvalue(samples, raw)[0] < 1e-6


def test_draft_model_proposals_keep_the_distribution():
    params = SamplingParams(temperature=0.8, top_k=5)
    W = chain(seed=3)
    Q = torch.softmax(chain(seed=4), dim=-1)  # a different chain as the draft model
    samples = generate(W, params, num_trials=6000, k=3, seed=2, Q=Q)
    pvalue, tv = chi_square_pvalue(samples, reference_joint(W, params))
    assert pvalue > 1e-3 and tv < 0.05, (pvalue, tv)


def test_greedy_verification_is_argmax_decoding():
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.4)
    W = chain(seed=5)
    raw = W.numpy()
    expected, last = [], PROMPT[-1]
    out = expected
    for _ in range(20):  # past the 12 checked: the last step may add up to 5
        t = int(np.argmax(reference_probs(raw[last], PROMPT, out, params)))
        out.append(t)
        last = t
    rng = np.random.default_rng(0)
    accepted_some = rejected_some = False
    outs = [[]]
    while len(outs[0]) < 12:
        n = len(outs[0])
        # The greedy continuation with some tokens corrupted: a mix of acceptances and rejections.
        d = [t if rng.random() < 0.7 else int(rng.integers(0, V)) for t in expected[n: n + 4]]
        new, _ = verify_step(W, params, outs, [d])
        good = 0
        while good < len(d) and d[good] == expected[n + good]:
            good += 1
        accepted_some |= good > 0
        rejected_some |= good < len(d)
        assert new[0] == expected[n: n + min(good, len(d)) + 1]
        outs[0].extend(new[0])
    assert outs[0][:12] == expected[:12]
    assert accepted_some and rejected_some


def test_mixed_batch_and_logprobs():
    """Greedy and random rows in one batch; logprobs are the raw target's at each output position."""
    W = chain(seed=6)
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=1.0, logprobs=2)]
    outs, drafts = [[1], [3]], [[4, 0], [2]]
    rows_params, rows_out, logits = [], [], []
    for p, out, d in zip(params, outs, drafts):
        for i in range(len(d) + 1):
            rows_params.append(p)
            rows_out.append(out + d[:i])
            logits.append(W[(PROMPT + out + d[:i])[-1]])
    logits = torch.stack(logits).float()
    meta = SamplingMetadata.from_requests(rows_params, rows_out, [PROMPT] * 5, [{EOS}] * 5, {}, V, CPU)
    layout = DraftLayout.build([2, 1], CPU)
    res = rejection_sample(logits, meta, layout, torch.tensor([4, 0, 2]), None, None)
    toks = res.token_ids.tolist()
    greedy_first = int(logits[0].argmax())
    assert toks[0][0] == greedy_first
    assert len(res.row_logprobs) == 5
    raw = torch.log_softmax(logits.double(), dim=-1)
    for b, first in enumerate([0, 3]):
        for j, t in enumerate(x for x in toks[b] if x >= 0):
            e = res.row_logprobs[first + j]
            assert e.sampled_logprob == pytest.approx(float(raw[first + j, t]), abs=1e-5)
            assert e.top_token_ids == raw[first + j].topk(2).indices.tolist()


def test_seeded_requests_reproduce_whatever_the_batch():
    W = chain(seed=7)
    params = SamplingParams(temperature=1.0, seed=42)

    def run(batch_extra: int, global_seed: int):
        torch.manual_seed(global_seed)
        outs = [[]] * (1 + batch_extra)
        drafts = [[1, 2, 3]] + [[0, 0]] * batch_extra
        gen = {0: torch.Generator().manual_seed(42)}
        return [verify_step(W, params, outs, drafts, generators=gen)[0][0] for _ in range(1)][0], gen

    a, _ = run(0, 1)
    b, _ = run(3, 2)
    assert a == b
    # Different seeds give different outcomes somewhere over many draws.
    results = set()
    for s in range(20):
        gen = {0: torch.Generator().manual_seed(s)}
        results.add(tuple(verify_step(W, params, [[]], [[1, 2, 3]], generators=gen)[0][0]))
    assert len(results) > 1


def test_draft_probs_with_other_support_and_greedy_rows():
    """One verification of many requests at once: random requests propose 2 tokens from a draft
    distribution q that has no mass on some tokens the target favours and mass on tokens the
    target (top-k) excludes; greedy requests in the same batch have all-zero draft rows (as the
    draft model leaves them). Each random request's first token has the target's distribution
    (chi-square against the float64 reference); each greedy request's is the argmax."""
    params = SamplingParams(temperature=0.9, top_k=4)
    W = chain(seed=12)
    last = PROMPT[-1]
    p_first = reference_probs(W[last].numpy(), PROMPT, [], params)
    q = torch.full((V, V), 0.0, dtype=torch.float64)
    # Never proposes tokens 3 and 5 (p ~ 0.15, 0.3); proposes token 1, which top-k excludes (p = 0).
    q[:] = torch.tensor([0.2, 0.2, 0.0, 0.0, 0.6, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    n_random, n_greedy = 12000, 50
    drafts, dprobs, rows_params, rows_out, rows_logits = [], [], [], [], []
    for b in range(n_random + n_greedy):
        greedy = b >= n_random
        d = [int(torch.multinomial(q[last], 1, generator=g))]
        d.append(int(torch.multinomial(q[d[0]], 1, generator=g)))
        drafts.append(d)
        dprobs += [torch.zeros(V)] * 2 if greedy else [q[last].float(), q[d[0]].float()]
        for i in range(3):
            rows_params.append(SamplingParams(temperature=0.0) if greedy else params)
            rows_out.append(d[:i])
            rows_logits.append(W[([last] + d)[i]])
    meta = SamplingMetadata.from_requests(rows_params, rows_out, [PROMPT] * len(rows_params),
                                          [{EOS}] * len(rows_params), {}, V, CPU)
    layout = DraftLayout.build([2] * len(drafts), CPU)
    torch.manual_seed(0)
    res = rejection_sample(torch.stack(rows_logits).float(), meta, layout,
                           torch.tensor([t for d in drafts for t in d]), torch.stack(dprobs), None)
    first = res.token_ids[:, 0]
    assert (first[n_random:] == int(W[last].argmax())).all()
    counts = torch.bincount(first[:n_random], minlength=V).numpy()
    support = p_first > 0
    assert counts[~support].sum() == 0
    assert chisquare(counts[support], p_first[support] * n_random).pvalue > 1e-3
    # q alone never gives tokens 3 and 5: the residual max(p - q, 0) must have supplied them.
    assert counts[[3, 5]].sum() > 0.5 * p_first[[3, 5]].sum() * n_random
    # The first proposal is kept with probability sum_x min(p(x), q(x)) (with q taken as one-hot,
    # as for n-gram proposals, it would be sum_x q(x) p(x): also exact, but lower).
    kept = ((res.token_ids[:n_random] >= 0).sum(dim=1) > 1).double().mean().item()
    rate = float(np.minimum(p_first, q[last].numpy()).sum())
    assert abs(kept - rate) < 4 * math.sqrt(rate * (1 - rate) / n_random), (kept, rate)
    assert rate - float((p_first * q[last].numpy()).sum()) > 0.1
