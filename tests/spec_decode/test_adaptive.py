"""The adaptive policy on synthetic step times: it proposes where the model of the step says it
pays and not elsewhere, per request by acceptance, and keeps both kinds of step measured."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_engine.spec_decode.adaptive import AdaptiveSpeculation, StepTimeModel, expected_tokens


def feed(policy: AdaptiveSpeculation, spec_time, plain_time, sizes=(1, 2, 4, 8)) -> None:
    for n in sizes:
        policy.observe_step(n, spec_time(n), speculative=True)
        policy.observe_step(n, plain_time(n), speculative=False)


def test_step_time_model_fits_a_line():
    m = StepTimeModel()
    for n in (1, 5, 9, 13):
        m.observe(n, 0.010 + 0.002 * n)
    a, b = m.fit()
    assert a == pytest.approx(0.010) and b == pytest.approx(0.002)
    m2 = StepTimeModel()
    for _ in range(4):
        m2.observe(3, 0.5)
    assert m2.fit() == (pytest.approx(0.5), 0.0)


def test_acceptance_estimate_follows_a_request():
    rng = np.random.default_rng(0)
    p = AdaptiveSpeculation(4, ewma=0.05)
    for alpha in (0.9, 0.2):
        for _ in range(400):
            accepted = 0
            while accepted < 4 and rng.random() < alpha:
                accepted += 1
            p.observe_verified("r", 4, accepted)
        assert p.acceptance["r"] == pytest.approx(alpha, abs=0.08)


def test_memory_bound_batch_one_proposes_all_k():
    """A step costs about the same at 1 or 5 tokens (the GPU at batch 1): every token proposed."""
    p = AdaptiveSpeculation(4)
    feed(p, spec_time=lambda n: 0.011 + 1e-5 * n, plain_time=lambda n: 0.010 + 1e-5 * n)
    p.observe_verified("a", 4, 3)
    assert p.plan(["a"], 1) == [4]


def test_compute_bound_low_acceptance_proposes_nothing():
    """A large batch whose step time grows with every token, and requests that rarely accept."""
    p = AdaptiveSpeculation(4, ewma=1.0)
    feed(p, spec_time=lambda n: 0.02 + 1e-4 * n, plain_time=lambda n: 0.02 + 1e-4 * n,
         sizes=(128, 256, 512, 1024))
    ids = [f"r{i}" for i in range(256)]
    for r in ids:
        p.observe_verified(r, 4, 0)
    assert p.plan(ids, 256) is None


def test_per_request_depth_by_acceptance():
    """Step time grows with tokens: a request that accepts most gets more tokens than one that
    accepts few, and one that accepts none gets none."""
    p = AdaptiveSpeculation(4, ewma=1.0)
    feed(p, spec_time=lambda n: 0.02 + 2e-4 * n, plain_time=lambda n: 0.02 + 2e-4 * n,
         sizes=(32, 64, 128, 192))
    ids = [f"r{i}" for i in range(64)]
    for i, r in enumerate(ids):
        p.observe_verified(r, 4, 4 if i % 3 == 0 else (1 if i % 3 == 1 else 0))
    ks = p.plan(ids, 64)
    assert ks is not None
    high, mid, none = ks[0], ks[1], ks[2]
    assert high > mid >= none == 0
    # The step that was planned beats the plain one in the policy's own model.
    alphas = [p.acceptance[r] for r in ids]
    gain = sum(expected_tokens(a, k) for a, k in zip(alphas, ks))
    assert gain / p.spec_time.predict(64 + sum(ks)) > 64 / p.plain_time.predict(64)


def test_slower_verifying_steps_turn_it_off():
    """Steps with proposals cost 2x (eager instead of graphs) and acceptance is modest: off."""
    p = AdaptiveSpeculation(2, ewma=1.0)
    feed(p, spec_time=lambda n: 0.02 + 1e-6 * n, plain_time=lambda n: 0.01 + 1e-6 * n)
    p.observe_verified("a", 2, 0)
    p.observe_verified("b", 2, 1)
    assert p.plan(["a", "b"], 2) is None
    # ...but with full acceptance 3 tokens per step beat 2x the time (evaluated at the next probe).
    p.observe_verified("a", 2, 2)
    p.observe_verified("b", 2, 2)
    assert p._best_plan(["a", "b"], 2) == [2, 2]


def test_exploration_keeps_both_kinds_measured():
    p = AdaptiveSpeculation(3, probe_interval=10, ewma=1.0)
    assert p.plan(["a"], 1) == [3]  # nothing measured: try proposals first
    for _ in range(4):
        p.observe_step(1, 0.02, speculative=True)
    assert p.plan(["a"], 1) is None  # then measure steps without
    for _ in range(4):
        p.observe_step(1, 0.01, speculative=False)
    p.observe_verified("a", 3, 0)
    assert p.plan(["a"], 1) is None  # proposals do not pay
    for _ in range(20):
        p.observe_step(1, 0.01, speculative=False)
    assert p.plan(["a"], 1) == [3]  # a probe (after twice probe_interval: they lost)


def test_probes_back_off_while_proposals_lose():
    p = AdaptiveSpeculation(2, probe_interval=4, max_probe_interval=32, ewma=1.0)
    feed(p, spec_time=lambda n: 0.025, plain_time=lambda n: 0.01)
    p.observe_verified("a", 2, 0)
    probes = []
    for step in range(200):
        ks = p.plan(["a"], 1)
        probes += [step] if ks else []
        p.observe_step(1 + (sum(ks) if ks else 0), 0.025 if ks else 0.01, speculative=bool(ks))
    gaps = np.diff(probes)
    assert list(gaps[:3]) == [17, 33, 33]  # the interval doubles up to the cap (+1: the probe itself)
    # A new load (the batch grew) is evaluated at once, not at the next probe.
    p.observe_verified("a", 2, 2)
    assert p.plan(["a"], 1) is None and p.plan(["a"] * 2, 2) == [2, 2]
    p.observe_verified("a", 2, 0)
    # Proposals that start to pay are taken up again at the next probe.
    p.observe_verified("a", 2, 2)
    for _ in range(40):
        ks = p.plan(["a"], 1)
        if ks:
            break
        p.observe_step(1, 0.01, speculative=False)
    assert ks == [2]
