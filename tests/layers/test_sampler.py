"""Sampler tests: every transform against a float64 / hand-computed reference, the sampled
distribution against softmax, seeded reproducibility, and logprobs against torch.log_softmax."""

from __future__ import annotations


import pytest
import torch

from vllm_engine.layers.sampler import (
    Sampler,
    SamplingMetadata,
    apply_logit_bias_and_min_tokens,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    compute_logprobs_topk,
)
from vllm_engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
NEG_INF = float("-inf")


def make_meta(params, outputs=None, prompts=None, eos=None, generators=None, vocab_size=16):
    n = len(params)
    return SamplingMetadata.from_requests(
        params=params,
        output_token_ids=outputs if outputs is not None else [[] for _ in range(n)],
        prompt_token_ids=prompts if prompts is not None else [[0] for _ in range(n)],
        eos_token_ids=eos if eos is not None else [set() for _ in range(n)],
        generators=generators or {},
        vocab_size=vocab_size,
        device=CPU,
    )


def distinct_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random logits with no ties (a random permutation of spread-out values per row)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(-4.0, 4.0, vocab)
    return torch.stack([base[torch.randperm(vocab, generator=g)] for _ in range(rows)])


def kept(x: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in x]


# ---- metadata --------------------------------------------------------------------------------------
def test_metadata_skips_unused_fields():
    meta = make_meta([SamplingParams(temperature=0.0), SamplingParams(temperature=0.0)])
    assert meta.all_greedy and meta.no_penalties
    for name in ("temperature", "top_k", "top_p", "min_p", "bias_index", "min_tokens_index",
                 "prompt_token_ids", "output_token_ids", "max_num_logprobs"):
        assert getattr(meta, name) is None, name
    meta = make_meta([SamplingParams(temperature=0.8, frequency_penalty=0.5)])
    assert meta.frequency_penalty is not None and meta.output_token_ids is not None
    assert meta.prompt_token_ids is None and meta.repetition_penalty is None and meta.top_k is None


# ---- greedy ------------------------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits, make_meta([SamplingParams(temperature=0.0)] * 7, vocab_size=50))
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.sampled_token_ids.tolist() == logits.double().argmax(dim=-1).tolist()
    assert out.logprobs is None


def test_sampler_does_not_modify_logits():
    logits = distinct_logits(3, 16)
    before = logits.clone()
    params = [SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.1, repetition_penalty=1.5,
                             logit_bias={2: 3.0}, min_tokens=3, stop_token_ids=[4])] * 3
    Sampler()(logits, make_meta(params, outputs=[[1, 2]] * 3, prompts=[[3]] * 3))
    assert torch.equal(logits, before)


# ---- logit bias and min_tokens ------------------------------------------------------------------------
def test_logit_bias_and_min_tokens_masking():
    V = 10
    logits = distinct_logits(4, V)
    params = [
        SamplingParams(logit_bias={1: 2.5, 7: -100.0}),
        SamplingParams(min_tokens=3, stop_token_ids=[5]),  # 2 outputs so far: EOS 9 and 5 masked
        SamplingParams(min_tokens=3, stop_token_ids=[5], ignore_eos=True),  # only the stop id masked
        SamplingParams(min_tokens=2, stop_token_ids=[5]),  # 2 outputs: min_tokens reached, nothing masked
    ]
    meta = make_meta(params, outputs=[[0], [0, 1], [0, 1], [0, 1]], eos=[{9}] * 4, vocab_size=V)
    got = logits.clone()
    apply_logit_bias_and_min_tokens(got, meta)
    ref = logits.double().clone()
    ref[0, 1] += 2.5
    ref[0, 7] -= 100.0
    ref[1, [5, 9]] = NEG_INF
    ref[2, 5] = NEG_INF
    torch.testing.assert_close(got.double(), ref)


def test_greedy_follows_logit_bias():
    logits = torch.zeros(1, 8)
    logits[0, 3] = 1.0
    out = Sampler()(logits, make_meta([SamplingParams(temperature=0.0, logit_bias={6: 1.5})], vocab_size=8))
    assert out.sampled_token_ids.tolist() == [6]


# ---- penalties ---------------------------------------------------------------------------------------
def _ref_penalties(logits, prompts, outputs, rep, freq, pres):
    """Hand-written float64 reference: loops over tokens, straight from the definitions."""
    ref = logits.double().clone()
    for r in range(ref.shape[0]):
        for t in set(prompts[r]) | set(outputs[r]):
            ref[r, t] = ref[r, t] / rep[r] if ref[r, t] > 0 else ref[r, t] * rep[r]
        for t in set(outputs[r]):
            c = outputs[r].count(t)
            ref[r, t] -= freq[r] * c + pres[r]
    return ref


def test_repetition_frequency_presence_penalties():
    V = 12
    logits = distinct_logits(3, V, seed=3)
    prompts = [[1, 2, 2, 3], [4], [5, 6]]
    outputs = [[3, 3, 3, 7], [4, 4, 8], []]
    rep, freq, pres = [1.5, 1.0, 0.7], [0.5, -0.3, 0.0], [0.25, 1.0, 2.0]
    params = [SamplingParams(repetition_penalty=rep[i], frequency_penalty=freq[i], presence_penalty=pres[i])
              for i in range(3)]
    meta = make_meta(params, outputs=outputs, prompts=prompts, vocab_size=V)
    got = logits.clone()
    apply_penalties(got, meta)
    torch.testing.assert_close(got.double(), _ref_penalties(logits, prompts, outputs, rep, freq, pres),
                               rtol=1e-6, atol=1e-6)
    # Known values on one entry: token 3 of row 0 (in prompt and 3 times in the output).
    x = logits[0, 3].item()
    expect = (x / 1.5 if x > 0 else x * 1.5) - (0.5 * 3 + 0.25)
    assert got[0, 3].item() == pytest.approx(expect, abs=1e-5)


def test_frequency_penalty_alone_ignores_prompt():
    V = 6
    logits = torch.zeros(1, V)
    meta = make_meta([SamplingParams(frequency_penalty=1.0)], outputs=[[2, 2, 5]], prompts=[[1, 1, 3]], vocab_size=V)
    apply_penalties(logits, meta)
    assert logits.tolist() == [[0.0, 0.0, -2.0, 0.0, 0.0, -1.0]]


# ---- top-k / top-p / min-p ---------------------------------------------------------------------------
def _ref_keep_top_k_top_p(row: torch.Tensor, k: int, p: float) -> set[int]:
    """float64 reference: the k largest, then (renormalised) the most likely tokens until their mass >= p."""
    order = torch.argsort(row.double(), descending=True).tolist()[:k]
    probs = torch.softmax(row.double()[order], dim=0).tolist()
    keep, mass = set(), 0.0
    for tok, pr in zip(order, probs):
        keep.add(tok)
        mass += pr
        if mass >= p:
            break
    return keep


@pytest.mark.parametrize("mode", ["top_k", "top_k_sorted", "top_p", "both"])
def test_top_k_top_p_keep_sets(mode):
    V, B = 20, 6
    logits = distinct_logits(B, V, seed=7) * 0.6
    ks = [1, 3, 5, V, 19, 2]
    ps = [0.5, 0.9, 0.3, 0.75, 1.0, 0.99]
    if mode.startswith("top_k"):
        ps = [1.0] * B
    if mode == "top_p":
        ks = [V] * B
    top_k = torch.tensor(ks) if mode != "top_p" else None
    top_p = torch.tensor(ps) if not mode.startswith("top_k") else None
    # "top_k" takes the partial-topk path (max_top_k given), "top_k_sorted" the full sort.
    max_top_k = max(k for k in ks if k < V) if mode in ("top_k", "both") else None
    got = logits.clone()
    apply_top_k_top_p(got, top_k, top_p, max_top_k=max_top_k)
    for r in range(B):
        assert kept(got)[r] == _ref_keep_top_k_top_p(logits[r], ks[r], ps[r]), (mode, r)
        finite = torch.isfinite(got[r])
        assert torch.equal(got[r][finite], logits[r][finite])  # kept logits unchanged


def test_min_p_keep_set():
    V = 16
    logits = distinct_logits(3, V, seed=11)
    min_p = torch.tensor([0.0, 0.05, 0.5])
    got = logits.clone()
    apply_min_p(got, min_p)
    probs = torch.softmax(logits.double(), dim=-1)
    for r in range(3):
        ref = set(torch.nonzero(probs[r] >= min_p[r].double() * probs[r].max()).flatten().tolist())
        assert kept(got)[r] == ref
    assert kept(got)[0] == set(range(V))


# ---- sampling distribution ---------------------------------------------------------------------------
def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    expected = probs * n
    mask = expected > 0
    assert counts[~mask].sum() == 0, "sampled a token of probability 0"
    return (((counts[mask] - expected[mask]) ** 2) / expected[mask]).sum().item()


# chi-square critical values at p = 1e-4 (so a correct sampler fails about once in 10^4 runs)
_CHI2_CRIT = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 6: 27.9, 7: 29.9}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_distribution_matches_softmax(temperature):
    torch.manual_seed(0)
    V, N = 6, 60_000
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    logits = row.expand(N, V).contiguous()
    out = Sampler()(logits, make_meta([SamplingParams(temperature=temperature)] * N, vocab_size=V))
    counts = torch.bincount(out.sampled_token_ids, minlength=V).double()
    probs = torch.softmax(row.double() / temperature, dim=0)
    assert _chi_square(counts, probs) < _CHI2_CRIT[V - 1]


@pytest.mark.parametrize("top_k,top_p,min_p", [(6, 1.0, 0.1), (5, 0.8, 0.0), (-1, 0.9, 0.05)])
def test_distribution_with_filters_is_renormalised(top_k, top_p, min_p):
    torch.manual_seed(1)
    V, N, T = 8, 40_000, 0.8
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])[torch.randperm(8)]
    logits = row.expand(N, V).contiguous()
    params = [SamplingParams(temperature=T, top_k=top_k, top_p=top_p, min_p=min_p)] * N
    out = Sampler()(logits, make_meta(params, vocab_size=V))
    counts = torch.bincount(out.sampled_token_ids, minlength=V).double()
    # Reference: top-k then top-p (float64 loop), then min-p, all on the tempered logits.
    scaled = row.double() / T
    keep = torch.zeros(V, dtype=torch.bool)
    keep[list(_ref_keep_top_k_top_p(scaled, top_k if top_k > 0 else V, top_p))] = True
    p = torch.softmax(scaled.masked_fill(~keep, NEG_INF), dim=0)
    keep &= p >= min_p * p.max()
    ref = torch.where(keep, p, 0.0)
    ref /= ref.sum()
    assert 1 < int(keep.sum()) < V  # the filters really filter
    assert _chi_square(counts, ref) < _CHI2_CRIT[int(keep.sum()) - 1]


# ---- seeds ---------------------------------------------------------------------------------------
def _run_steps(batch_logits_fn, params, seeded_row, seed, steps=12):
    gen = torch.Generator().manual_seed(seed)
    sampler, tokens = Sampler(), []
    for step in range(steps):
        logits = batch_logits_fn(step)
        meta = make_meta(params, generators={seeded_row: gen}, vocab_size=logits.shape[1])
        tokens.append(sampler(logits, meta).sampled_token_ids[seeded_row].item())
    return tokens


def test_seeded_rows_independent_of_batch():
    V = 40
    target = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 0.3
    seeded = SamplingParams(temperature=1.0, seed=123)

    def alone(step):
        return target.unsqueeze(0)

    def in_batch(step):  # different companions, different batch size, seeded row in the middle
        x = torch.randn(9, V)
        x[4] = target
        return x

    companions = [SamplingParams(temperature=0.9)] * 4 + [seeded] + [SamplingParams(temperature=0.0)] * 4
    a = _run_steps(alone, [seeded], 0, 123)
    torch.manual_seed(99)
    b = _run_steps(in_batch, companions, 4, 123)
    assert a == b
    assert len(set(a)) > 3  # really sampled, not a constant
    assert _run_steps(alone, [seeded], 0, 124) != a  # the seed matters


# ---- logprobs --------------------------------------------------------------------------------------
def test_logprobs_from_raw_logits_with_ranks():
    V = 30
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2)) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.5, logprobs=1, repetition_penalty=2.0, frequency_penalty=1.0),
        SamplingParams(temperature=1.3, top_k=4),  # no logprobs asked: still filled (runner trims)
        SamplingParams(temperature=0.0, logprobs=0, logit_bias={int(logits[3].argmin()): 100.0}),
    ]
    out = Sampler()(logits, make_meta(params, outputs=[[1], [1, 1, 2], [], []], prompts=[[3]] * 4, vocab_size=V))
    ref = torch.log_softmax(logits.double(), dim=-1)
    ids = out.sampled_token_ids.tolist()
    assert ids[3] == int(logits[3].argmin())  # the bias decided the token ...
    assert len(out.logprobs) == 4
    for r, lp in enumerate(out.logprobs):
        tok = ids[r]
        assert lp.sampled_logprob == pytest.approx(ref[r, tok].item(), abs=1e-5)  # ... not the logprob
        assert lp.sampled_rank == int((ref[r] > ref[r, tok]).sum()) + 1
        order = torch.argsort(ref[r], descending=True)[:3]
        assert lp.top_token_ids == order.tolist()
        assert lp.top_logprobs == pytest.approx(ref[r, order].tolist(), abs=1e-5)
    assert out.logprobs[0].sampled_rank == 1
    assert out.logprobs[3].sampled_rank == V


@pytest.mark.parametrize("k", [0, 2, 5])
def test_compute_logprobs_topk(k):
    V = 12
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([0, 3, 11, 7, 7])
    entries = compute_logprobs_topk(logits, ids, k)
    ref = torch.log_softmax(logits.double(), dim=-1)
    for r, e in enumerate(entries):
        assert e.sampled_logprob == pytest.approx(ref[r, ids[r]].item(), abs=1e-6)
        assert e.sampled_rank == int((ref[r] > ref[r, ids[r]]).sum()) + 1
        order = torch.argsort(ref[r], descending=True)[:k]
        assert e.top_token_ids == order.tolist()
        assert e.top_logprobs == pytest.approx(ref[r, order].tolist(), abs=1e-6)
        assert all(isinstance(t, int) for t in e.top_token_ids)


# ---- mixed batch ---------------------------------------------------------------------------------
def test_mixed_batch_greedy_rows_use_penalised_argmax():
    V = 16
    logits = distinct_logits(4, V, seed=9)
    top = logits.argmax(dim=-1)
    params = [
        SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0),  # top token penalised
        SamplingParams(temperature=1.0, top_k=1),  # sampling with top_k=1 is the argmax too
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.9, seed=3),
    ]
    outputs = [[int(top[0])] * 3, [], [int(top[2])] * 5, []]
    gens = {3: torch.Generator().manual_seed(3)}
    out = Sampler()(logits, make_meta(params, outputs=outputs, generators=gens, vocab_size=V))
    ref0 = _ref_penalties(logits[:1], [[0]], outputs[:1], [1.0], [2.0], [2.0])[0]
    ids = out.sampled_token_ids.tolist()
    assert ids[0] == int(ref0.argmax()) and ids[0] != int(top[0])
    assert ids[1] == int(top[1])
    assert ids[2] == int(top[2])  # greedy without penalties: outputs don't matter
    assert ids[3] in _ref_keep_top_k_top_p(logits[3] / 0.7, V, 0.9)


# ---- GPU: no host syncs --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_gpu():
    """The whole sampling path (penalties, filters, seeded rows) queues work without waiting on the GPU."""
    dev = torch.device("cuda")
    B, V = 64, 32000
    logits = torch.randn(B, V, device=dev)
    params = [SamplingParams(temperature=0.0 if i % 4 == 0 else 0.8, top_k=50 if i % 3 == 0 else -1,
                             top_p=0.9 if i % 2 else 1.0, min_p=0.05 if i % 5 == 0 else 0.0,
                             repetition_penalty=1.2 if i % 7 == 0 else 1.0, presence_penalty=0.5 if i % 6 == 0 else 0.0,
                             logit_bias={3: 2.0} if i % 8 == 0 else None, min_tokens=4, stop_token_ids=[7],
                             seed=i if i % 9 == 0 else None) for i in range(B)]
    gens = {i: torch.Generator(device=dev).manual_seed(i) for i in range(B) if params[i].seed is not None}
    meta = SamplingMetadata.from_requests(params, [[1, 2, 3]] * B, [[4, 5]] * B, [{2}] * B, gens, V, dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = Sampler()(logits, meta)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ids = out.sampled_token_ids.tolist()
    assert all(0 <= t < V and t not in (2, 7) for t in ids)


def test_metadata_through_staging_equals_one_copy_per_field():
    """``staging``: every field's tensor comes out of the runner's one packed copy, equal in value,
    dtype and shape to the field built on its own; unused fields stay None."""
    from vllm_engine.worker.staging import HostStaging

    params = [SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                             frequency_penalty=0.5, logit_bias={2: 1.5, 40: 3.0}, min_tokens=3, stop_token_ids=[5]),
              SamplingParams(temperature=1.3, presence_penalty=-0.4)]
    args = dict(params=params, output_token_ids=[[1], [2, 3], []], prompt_token_ids=[[4, 5, 6], [7], [8, 9]],
                eos_token_ids=[{0}, {1}, {0}], generators={}, vocab_size=16, device=CPU)
    plain = SamplingMetadata.from_requests(**args)
    staged = SamplingMetadata.from_requests(**args, staging=HostStaging(CPU))
    tensors = 0
    for name, value in vars(plain).items():
        other = getattr(staged, name)
        if isinstance(value, torch.Tensor):
            tensors += 1
            assert other.dtype == value.dtype and other.shape == value.shape and torch.equal(other, value), name
        else:
            assert other == value, name
    assert tensors == 13 and plain.greedy_mask.tolist() == [True, False, False]
    greedy_only = SamplingMetadata.from_requests(**dict(args, params=[SamplingParams(temperature=0.0)] * 3),
                                                 staging=HostStaging(CPU))
    assert greedy_only.temperature is None and greedy_only.output_token_ids is None
