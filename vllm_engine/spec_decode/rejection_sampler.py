"""Rejection sampling: verifies proposed tokens against the target model and keeps its distribution.

A request with k proposed tokens d_1..d_k has k + 1 rows of target logits: row i (0-based) is
the target's next-token distribution p_i after the context and d_1..d_i. Row i's distribution is
the *processed* one, exactly what the sampler would draw from at that point (grammar mask, logit bias,
min_tokens, penalties over the output so far including d_1..d_i, temperature, top-k, top-p,
min-p: layers/sampler.py's transforms on ``SamplingMetadata`` rows built that way).

- Greedy rows (temperature < 1e-5): d_i is accepted while it equals argmax p_{i-1}; the first
  mismatch, or row k after all are accepted, gives argmax. The tokens are those of plain greedy
  decoding.
- Random rows (Leviathan et al. 2023, Chen et al. 2023): d_i drawn from the proposal q_{i-1}
  (one-hot for n-gram lookup: ``draft_probs`` None) is accepted with probability
  min(1, p(d_i) / q(d_i)); at the first rejection the token is drawn from the residual
  max(p - q, 0) (normalised), and when all k are accepted a bonus token is drawn from p_k. Each
  output token then has the target's distribution exactly.

Seeded requests draw their uniforms and their final sample from their own generator (the runner's
per-request ``torch.Generator``), so a seeded request reproduces whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from vllm_engine.core.sched_output import SampledLogprobs
from vllm_engine.layers.sampler import (
    SamplingMetadata, apply_logit_bias_and_min_tokens, apply_min_p, apply_penalties, apply_top_k_top_p,
    compute_logprobs_topk, exponential_race)
from vllm_engine.structured_output.bitmask import apply_token_bitmask
from vllm_engine.utils import host_to_device

if TYPE_CHECKING:
    from vllm_engine.worker.staging import HostStaging


@dataclass
class DraftLayout:
    """Where each request's rows are: request b has ``num_draft_tokens[b]`` (k_b) draft rows
    followed by its bonus row, from flat row ``first_row[b]``; rows total R = sum(k_b + 1).
    Device tensors (built on the host, one copy each, so that nothing here waits for the device):
    ``num_drafts`` [B], ``first_row`` [B], ``draft_rows`` [D] (D = sum k_b), ``draft_req`` [D] (the
    request of each draft), ``draft_pos`` [D] (0..k_b - 1), ``row_req`` / ``row_col`` [R] (each
    row's request and its index among that request's rows)."""

    num_draft_tokens: list[int]
    max_drafts: int
    num_drafts: torch.Tensor
    first_row: torch.Tensor
    draft_rows: torch.Tensor
    draft_req: torch.Tensor
    draft_pos: torch.Tensor
    row_req: torch.Tensor
    row_col: torch.Tensor

    @classmethod
    def build(cls, num_draft_tokens: Sequence[int], device: torch.device,
              staging: Optional["HostStaging"] = None) -> "DraftLayout":
        """``staging`` (the runner's worker/staging.HostStaging): one host-to-device copy for all."""
        k = np.asarray(num_draft_tokens, dtype=np.int64)
        first = np.zeros(k.size, dtype=np.int64)
        np.cumsum(k[:-1] + 1, out=first[1:])
        req = np.repeat(np.arange(k.size, dtype=np.int64), k)
        pos = np.arange(int(k.sum()), dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
        rows = first[req] + pos
        row_req = np.repeat(np.arange(k.size, dtype=np.int64), k + 1)
        row_col = np.arange(row_req.size, dtype=np.int64) - first[row_req]
        arrays = (k, first, rows, req, pos, row_req, row_col)
        if staging is not None:
            t = staging.stage(*arrays)
        else:
            t = [host_to_device(torch.from_numpy(a), device) for a in arrays]
        return cls(list(map(int, k)), int(k.max(initial=0)), *t)

    @property
    def num_rows(self) -> int:
        return sum(self.num_draft_tokens) + len(self.num_draft_tokens)


@dataclass
class RejectionOutput:
    """``token_ids`` [B, max_drafts + 1] int64 on the device: each request's accepted drafts and then
    its final (recovered or bonus) token, -1 after. ``row_logprobs``: when asked, one entry per flat
    row: the raw logprobs of the token at that row's output position (the entries past a request's
    last token are meaningless)."""

    token_ids: torch.Tensor
    row_logprobs: Optional[list[SampledLogprobs]] = None


def processed_target(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[Optional[torch.Tensor],
                                                                           Optional[torch.Tensor]]:
    """(argmax of the penalised logits or None when no row is greedy, probabilities [R, V] float32
    of the processed distribution or None when every row is greedy), as ``Sampler`` computes them."""
    if meta.grammar_bitmask is not None:  # structured outputs: what each row's grammar allows, as Sampler
        logits = apply_token_bitmask(logits, meta.grammar_bitmask, meta.grammar_rows)
    logits = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    apply_logit_bias_and_min_tokens(logits, meta)
    apply_penalties(logits, meta)
    greedy = logits.argmax(dim=-1) if not meta.all_random else None
    if meta.all_greedy:
        return greedy, None
    logits.div_(meta.temperature.unsqueeze(1))
    apply_top_k_top_p(logits, meta.top_k, meta.top_p, meta.max_top_k)
    if meta.min_p is not None:
        apply_min_p(logits, meta.min_p)
    return greedy, torch.softmax(logits, dim=-1)


def rejection_sample(target_logits: torch.Tensor, meta: SamplingMetadata, layout: DraftLayout,
                     draft_token_ids: torch.Tensor, draft_probs: Optional[torch.Tensor] = None,
                     generators: Optional[dict[int, torch.Generator]] = None) -> RejectionOutput:
    """Verifies a batch of proposals.

    target_logits: [R, V] raw logits (any float dtype) of the rows of ``layout``; meta: the
    ``SamplingMetadata`` of those R rows (rows of one request share its parameters; their output
    tokens include the drafts before them); draft_token_ids: [D] int64; draft_probs: [D, V] the
    proposal distributions (None: deterministic proposals, one-hot); generators: request index b ->
    its generator (seeded requests). Logprobs (``meta.max_num_logprobs``) are of the raw logits.
    """
    generators = generators or {}
    device = target_logits.device
    B, K = len(layout.num_draft_tokens), layout.max_drafts
    greedy_ids, probs = processed_target(target_logits, meta)
    draft_token_ids = draft_token_ids.to(torch.int64)
    greedy_row = _greedy_rows(meta, target_logits.shape[0], device)

    accepted = torch.zeros(draft_token_ids.shape[0], dtype=torch.bool, device=device)
    if greedy_ids is not None:
        accepted |= greedy_ids[layout.draft_rows] == draft_token_ids
    if probs is not None:
        p = probs[layout.draft_rows, draft_token_ids]
        q = 1.0 if draft_probs is None else draft_probs.gather(1, draft_token_ids.unsqueeze(1)).squeeze(1)
        u = _uniforms(layout, generators, device)
        random_accept = u * q < p
        accepted = torch.where(greedy_row[layout.draft_rows], accepted, random_accept)

    num_accepted = count_accepted(accepted, layout)
    final_rows = layout.first_row + num_accepted

    final = _final_tokens(probs, greedy_ids, greedy_row, final_rows, num_accepted, layout,
                          draft_token_ids, draft_probs, generators)
    token_ids = torch.full((B, K + 1), -1, dtype=torch.int64, device=device)
    if K:
        drafts = torch.full((B, K), -1, dtype=torch.int64, device=device)
        drafts[layout.draft_req, layout.draft_pos] = draft_token_ids
        cols = torch.arange(K, device=device).unsqueeze(0)
        token_ids[:, :K] = torch.where(cols < num_accepted.unsqueeze(1), drafts, -1)
    token_ids.scatter_(1, num_accepted.unsqueeze(1), final.unsqueeze(1))

    row_logprobs = None
    if meta.max_num_logprobs is not None:
        row_tokens = token_ids[layout.row_req, layout.row_col]
        row_logprobs = compute_logprobs_topk(target_logits, row_tokens.clamp_min(0), meta.max_num_logprobs)
    return RejectionOutput(token_ids, row_logprobs)


def count_accepted(accepted: torch.Tensor, layout: DraftLayout) -> torch.Tensor:
    """[B] int64: each request's drafts before its first rejected one (``accepted``: [D] bool, one
    per draft in ``layout``'s order)."""
    B, K = len(layout.num_draft_tokens), layout.max_drafts
    device = accepted.device
    ok = torch.ones(B, K + 1, dtype=torch.int64, device=device)
    ok[:, K] = 0  # stops the count at k_b when all are accepted (padding past k_b is a stop too)
    pad_stop = torch.arange(K + 1, device=device).unsqueeze(0) >= layout.num_drafts.unsqueeze(1)
    ok.masked_fill_(pad_stop, 0)
    ok[layout.draft_req, layout.draft_pos] = accepted.to(torch.int64)
    return ok.cumprod(dim=1).sum(dim=1)


def _greedy_rows(meta: SamplingMetadata, num_rows: int, device: torch.device) -> torch.Tensor:
    if meta.all_greedy:
        return torch.ones(num_rows, dtype=torch.bool, device=device)
    if meta.all_random:
        return torch.zeros(num_rows, dtype=torch.bool, device=device)
    return meta.greedy_mask


def _uniforms(layout: DraftLayout, generators: dict[int, torch.Generator], device: torch.device) -> torch.Tensor:
    """U[0, 1) per draft; a seeded request's from its own generator (drawn before its final token)."""
    u = torch.rand(layout.draft_rows.shape[0], device=device)
    if generators:
        start = np.concatenate([[0], np.cumsum(layout.num_draft_tokens)])
        for b, gen in generators.items():
            k = layout.num_draft_tokens[b]
            if k:
                u[int(start[b]): int(start[b]) + k] = torch.rand(k, device=device, generator=gen)
    return u


def _final_tokens(probs: Optional[torch.Tensor], greedy_ids: Optional[torch.Tensor], greedy_row: torch.Tensor,
                  final_rows: torch.Tensor, num_accepted: torch.Tensor, layout: DraftLayout,
                  draft_token_ids: torch.Tensor, draft_probs: Optional[torch.Tensor],
                  generators: dict[int, torch.Generator]) -> torch.Tensor:
    """[B] the token after the accepted drafts: argmax on greedy rows; on random rows a draw from
    the residual max(p - q, 0) at a rejection, or from p at the bonus row."""
    greedy_final = greedy_ids[final_rows] if greedy_ids is not None else None
    if probs is None:
        return greedy_final
    dist = probs[final_rows]  # [B, V], a copy
    k = layout.num_drafts
    rejected = num_accepted < k
    if bool(layout.draft_rows.numel()):
        # The draft index of each request's rejected draft (clamped for requests with none rejected).
        start = torch.cumsum(k, 0) - k
        d = (start + num_accepted.clamp(max=(k - 1).clamp_min(0))).clamp(max=draft_token_ids.shape[0] - 1)
        if draft_probs is None:
            residual = dist.scatter(1, draft_token_ids[d].unsqueeze(1), 0.0)
        else:
            residual = (dist - draft_probs[d]).clamp_min_(0.0)
        dist = torch.where(rejected.unsqueeze(1), residual, dist)
    random_final = exponential_race(dist, generators)
    if greedy_final is None:
        return random_final
    return torch.where(greedy_row[final_rows], greedy_final, random_final)

