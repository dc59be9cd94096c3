"""Adaptive speculation: propose only where it pays, from measured step times and each request's
acceptance.

Per request, the chance that a proposed token is accepted, alpha, is estimated from its verified
steps: accepted tokens over accepted tokens plus the first rejection, both as moving sums (weight
``ewma`` on the newest step; ``prior_acceptance`` before any). A step of n tokens takes T(n) = a + b n, fitted by least
squares on recent steps, one line for steps with proposals and one for steps without (a step with
proposals has multi-token queries and waits for its tokens: it has its own cost even in its CUDA
graphs, worker/cuda_graphs.py's verify graphs).

Plan of a step with B requests that could propose, n tokens without proposals:
- request r's j-th proposed token adds alpha_r^j expected tokens for b_spec seconds; it is proposed
  while alpha_r^j > b_spec * B / T_spec(n) (the marginal token must beat the step's average rate);
- the step proposes at all only if its expected goodput sum_r E_r / T_spec(n + sum k_r), with
  E_r = 1 + alpha_r + ... + alpha_r^k_r, beats B / T_plain(n).
Without enough measurements of either kind it explores (steps with proposals first), and after
``probe_interval`` steps of one kind one step goes the other way, so both stay measured as the
load changes (at batch 1 that is one step in 50 without proposals). While proposals lose, the
plan is not evaluated again until the step size moves by a quarter or the next probe, and the
interval between probes doubles (up to ``max_probe_interval``): a large batch where they never pay
spends about one slower step in 1,600 on them, and next to no host time.
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Sequence


class StepTimeModel:
    """T(n) = a + b n over the last ``window`` (num_tokens, seconds) observations."""

    def __init__(self, window: int = 128) -> None:
        self.obs: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, num_tokens: int, seconds: float) -> None:
        self.obs.append((num_tokens, seconds))

    @property
    def ready(self) -> bool:
        return len(self.obs) >= 4

    def fit(self) -> tuple[float, float]:
        """(a, b), b >= 0; b = 0 (a = the mean) when every observation has the same n."""
        n = len(self.obs)
        mx = sum(x for x, _ in self.obs) / n
        my = sum(y for _, y in self.obs) / n
        sxx = sum((x - mx) ** 2 for x, _ in self.obs)
        if sxx == 0:
            return my, 0.0
        b = max(0.0, sum((x - mx) * (y - my) for x, y in self.obs) / sxx)
        return max(my - b * mx, 1e-9), b

    def predict(self, num_tokens: int) -> float:
        a, b = self.fit()
        return a + b * num_tokens


def expected_tokens(alpha: float, k: int) -> float:
    """1 + alpha + ... + alpha^k: the tokens a step gives a request with k proposals."""
    return sum(alpha ** i for i in range(k + 1))


class AdaptiveSpeculation:
    def __init__(self, num_speculative_tokens: int, prior_acceptance: float = 0.6, ewma: float = 0.3,
                 probe_interval: int = 50, max_probe_interval: int = 1600) -> None:
        self.k = num_speculative_tokens
        self.prior = prior_acceptance
        self.ewma = ewma
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        # Steps without proposals between probes with them: doubles each time proposals lose (a
        # probe costs a slower step), back to probe_interval when they win.
        self.spec_probe_interval = probe_interval
        self._losing = False
        self._lost_at = 0  # the step size (tokens) at which they last lost
        self.acceptance: dict[str, float] = {}
        self._counts: dict[str, tuple[float, float]] = {}
        self.spec_time = StepTimeModel()
        self.plain_time = StepTimeModel()
        self._steps_since = {True: 0, False: 0}  # steps since the last with / without proposals

    # ---- observations ------------------------------------------------------------------------------
    def observe_verified(self, req_id: str, num_drafted: int, num_accepted: int) -> None:
        """One request's verification: ``num_accepted`` of its ``num_drafted`` proposals kept."""
        trials = num_accepted + (1 if num_accepted < num_drafted else 0)
        if trials == 0:
            return
        # Moving sums of successes and trials (their ratio: the estimate; a mean of per-step
        # ratios would be biased low).
        s, t = self._counts.get(req_id, (self.prior, 1.0))
        w = self.ewma
        s, t = (1 - w) * s + w * num_accepted, (1 - w) * t + w * trials
        self._counts[req_id] = (s, t)
        self.acceptance[req_id] = s / t

    def observe_step(self, num_tokens: int, seconds: float, speculative: bool) -> None:
        (self.spec_time if speculative else self.plain_time).observe(num_tokens, seconds)
        self._steps_since[speculative] = 0
        self._steps_since[not speculative] += 1

    def forget(self, live_ids: Sequence[str]) -> None:
        """Drops the estimates of requests not in ``live_ids`` (cheap when there are none)."""
        if len(self._counts) > len(live_ids):
            live_ids = set(live_ids)
            self.acceptance = {r: a for r, a in self.acceptance.items() if r in live_ids}
            self._counts = {r: c for r, c in self._counts.items() if r in live_ids}

    # ---- the plan ------------------------------------------------------------------------------------
    def plan(self, req_ids: Sequence[str], num_tokens: int) -> Optional[list[int]]:
        """How many tokens each of ``req_ids`` may propose this step (None: no proposals at all);
        ``num_tokens``: the step's tokens without proposals."""
        if not req_ids:
            return None
        if not self.spec_time.ready or self._steps_since[True] >= self.spec_probe_interval:
            self._losing = False
            return [self.k] * len(req_ids)  # explore: measure steps with proposals
        if self._losing and 0.8 * self._lost_at <= num_tokens <= 1.25 * self._lost_at:
            return None  # until the next probe or a new load: no per-request work while they do not pay
        if not self.plain_time.ready or self._steps_since[False] >= self.probe_interval:
            return None  # explore: measure steps without
        ks = self._best_plan(req_ids, num_tokens)
        self._losing, self._lost_at = ks is None, num_tokens
        self.spec_probe_interval = (min(2 * self.spec_probe_interval, self.max_probe_interval) if ks is None
                                    else self.probe_interval)
        return ks

    def _best_plan(self, req_ids: Sequence[str], num_tokens: int) -> Optional[list[int]]:
        alphas = [self.acceptance.get(r, self.prior) for r in req_ids]
        a, b = self.spec_time.fit()
        rate = len(req_ids) / (a + b * num_tokens)
        ks = [self._depth(alpha, b * rate) for alpha in alphas]
        if not any(ks):
            return None
        gain = sum(expected_tokens(al, k) for al, k in zip(alphas, ks))
        spec_rate = gain / self.spec_time.predict(num_tokens + sum(ks))
        plain_rate = len(req_ids) / self.plain_time.predict(num_tokens)
        return ks if spec_rate > plain_rate else None

    def _depth(self, alpha: float, threshold: float) -> int:
        j = 0
        while j < self.k and alpha ** (j + 1) > threshold:
            j += 1
        return j
