"""Adaptive speculation: propose only where it pays, from measured step times and each request's
acceptance.

Per request, the chance that a proposed token is accepted, alpha, is estimated from its verified
steps: accepted tokens over accepted tokens plus the first rejection, both as moving sums (weight
``ewma`` on the newest step; ``prior_acceptance`` before any). A step of n tokens takes T(n) = a + b n, fitted by least
squares on recent steps, one line for steps with proposals and one for steps without (a step with
proposals has multi-token queries: on a GPU it runs eager, without the decode CUDA graphs).

Plan of a step with B requests that could propose, n tokens without proposals:
- request r's j-th proposed token adds alpha_r^j expected tokens for b_spec seconds; it is proposed
  while alpha_r^j > b_spec * B / T_spec(n) (the marginal token must beat the step's average rate);
- the step proposes at all only if its expected goodput sum_r E_r / T_spec(n + sum k_r), with
  E_r = 1 + alpha_r + ... + alpha_r^k_r, beats B / T_plain(n).
Without enough measurements of either kind it explores (steps with proposals first), and after
``probe_interval`` steps of one kind one step goes the other way, so both stay measured as the
load changes (at batch 1 that is one step in 50 without proposals).
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
                 probe_interval: int = 50) -> None:
        self.k = num_speculative_tokens
        self.prior = prior_acceptance
        self.ewma = ewma
        self.probe_interval = probe_interval
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

    def forget(self, live_ids: set[str]) -> None:
        if len(self.acceptance) > len(live_ids):
            self.acceptance = {r: a for r, a in self.acceptance.items() if r in live_ids}
            self._counts = {r: c for r, c in self._counts.items() if r in live_ids}

    # ---- the plan ------------------------------------------------------------------------------------
    def plan(self, req_ids: Sequence[str], num_tokens: int) -> Optional[list[int]]:
        """How many tokens each of ``req_ids`` may propose this step (None: no proposals at all);
        ``num_tokens``: the step's tokens without proposals."""
        if not req_ids:
            return None
        alphas = [self.acceptance.get(r, self.prior) for r in req_ids]
        if not self.spec_time.ready or self._steps_since[True] >= self.probe_interval:
            return [self.k] * len(req_ids)  # explore: measure steps with proposals
        if not self.plain_time.ready or self._steps_since[False] >= self.probe_interval:
            return None  # explore: measure steps without
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
