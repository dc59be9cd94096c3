"""The model runner's side of a step that verifies proposals (``ExecuteModelRequest.spec_token_ids``).

Such a step computes, for a request with k proposed tokens, its last token and the k proposals as
k + 1 query tokens in the same forward as everything else (a multi-token query, as a prompt chunk
is); the logits of those k + 1 rows go through ``rejection_sample``. Requests without proposals in
the same step are sampled the same way with k = 0 (their one row: the target's distribution).
The step's tokens reach the worker's request states in ``VerifiedStep.write`` (from
``ModelRunner.collect``): the engine never launches a step while one with proposals is in flight,
so no placeholder stands for them.

A step whose verified requests are all greedy and ask no logprobs takes a shorter path: the device
computes only each row's (processed) argmax, and ``write`` applies the greedy rule on the host, where
the tokens are needed anyway (a proposal is kept while it equals the argmax of the row before it;
the argmax of the row after the last kept one follows). The same tokens as ``rejection_sample``'s
greedy rows, for a few launches instead of about thirty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from vllm_engine.core.sched_output import ModelRunnerOutput, SampledLogprobs
from vllm_engine.layers.sampler import SamplingMetadata
from vllm_engine.spec_decode.rejection_sampler import DraftLayout, count_accepted, processed_target, rejection_sample
from vllm_engine.utils import host_to_device

if TYPE_CHECKING:
    from vllm_engine.worker.request_states import CachedRequestState
    from vllm_engine.worker.staging import HostStaging


def input_token_ids(states: Sequence["CachedRequestState"], spec: dict[str, list[int]], starts: np.ndarray,
                    query_start_loc: np.ndarray, total: int) -> np.ndarray:
    """[total] int64: each request's tokens from ``starts[i]`` on, then its proposals."""
    token_ids = np.empty(total, dtype=np.int64)
    for i, r in enumerate(states):
        seq = r.token_ids[starts[i]:] + spec.get(r.req_id, [])
        token_ids[query_start_loc[i]: query_start_loc[i + 1]] = seq[: query_start_loc[i + 1] - query_start_loc[i]]
    return token_ids


def verify_rows(last_rows: np.ndarray, num_drafts: np.ndarray) -> np.ndarray:
    """Flat rows whose logits a verifying step needs: for a sampled request whose last row is
    ``last_rows[j]``, its ``num_drafts[j] + 1`` rows ending there."""
    n = num_drafts + 1
    first = np.repeat(last_rows - num_drafts, n)
    offset = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return first + offset


@dataclass
class VerifiedStep:
    """A launched verification: its tokens on the device until ``write`` reads them.

    Either ``token_ids`` (the rejection sampler's result) or, on the greedy path, ``greedy_ids``
    (each row's argmax) with ``drafts`` (each request's proposals, host ints)."""

    token_ids: Optional[torch.Tensor]  # [B, K + 1] int64, -1 past each request's tokens
    states: list["CachedRequestState"]
    req_indices: list[int]  # index in the step's req_ids of each verified request
    first_row: list[int]  # its first row among the step's verified rows
    row_logprobs: Optional[list[SampledLogprobs]] = None
    greedy_ids: Optional[torch.Tensor] = None  # [R] int64 on the device: the greedy path's argmaxes
    drafts: Optional[list[list[int]]] = None  # the greedy path: each request's proposals
    host: Optional[torch.Tensor] = None  # pinned copy (CUDA), valid once `copied` completed
    copied: Optional[torch.cuda.Event] = None
    wait_s: float = 0.0
    done: bool = field(default=False)

    def _device_result(self) -> torch.Tensor:
        return self.token_ids if self.greedy_ids is None else self.greedy_ids

    def _host_rows(self) -> list[list[int]]:
        """Each request's tokens: the rejection sampler's, or the greedy rule over the argmaxes."""
        t0 = time.perf_counter()
        if self.copied is not None:
            self.copied.synchronize()
            result = self.host.tolist()
        else:
            result = self._device_result().tolist()
        self.wait_s = time.perf_counter() - t0
        if self.greedy_ids is None:
            return [[t for t in row if t >= 0] for row in result]
        return [greedy_tokens(d, result[first: first + len(d) + 1]) for d, first in zip(self.drafts, self.first_row)]

    def accepted_counts(self) -> torch.Tensor:
        """[B] int64 on the device: each verified request's kept proposals (queued, no wait)."""
        if self.greedy_ids is None:
            return (self.token_ids >= 0).sum(dim=1) - 1
        device = self.greedy_ids.device
        layout = DraftLayout.build([len(d) for d in self.drafts], device)
        draft_ids = host_to_device(torch.tensor([t for d in self.drafts for t in d], dtype=torch.int64), device)
        return count_accepted(self.greedy_ids[layout.draft_rows] == draft_ids, layout)

    def write(self, out: ModelRunnerOutput) -> None:
        """Each request's tokens (and logprobs) into ``out``, and appended to its worker state."""
        if self.done:
            return
        self.done = True
        rows = self._host_rows()
        for b, (st, i) in enumerate(zip(self.states, self.req_indices)):
            tokens = rows[b]
            out.sampled_token_ids[i] = tokens
            st.token_ids.extend(tokens)
            st.output_token_ids.extend(tokens)
            n = st.sampling_params.logprobs
            if self.row_logprobs is not None and n is not None:
                entries = self.row_logprobs[self.first_row[b]: self.first_row[b] + len(tokens)]
                out.logprobs[i] = [SampledLogprobs(e.sampled_logprob, e.sampled_rank, e.top_token_ids[:n],
                                                   e.top_logprobs[:n]) for e in entries]


def verify(logits: torch.Tensor, states: list["CachedRequestState"], req_indices: list[int],
           num_drafts: list[int], spec: dict[str, list[int]], generators: dict[int, torch.Generator],
           device: torch.device, staging: Optional["HostStaging"] = None,
           grammar: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
           draft_probs: Optional[torch.Tensor] = None) -> VerifiedStep:
    """Verifies the sampled requests ``states`` (``num_drafts[b]`` proposals each, ``logits`` their
    rows in order: [sum(num_drafts) + B, V]); ``generators``: request index b -> seeded generator;
    ``grammar``: (bitmask, rows) of the structured-output rows (``WorkerGrammars.fill_verify``);
    ``draft_probs``: [D, V] the proposals' distributions, in the order of the drafts (None: one-hot)."""
    params, outputs, prompts, eos, drafts = [], [], [], [], []  # drafts: each request's proposals
    for st, k in zip(states, num_drafts):
        d = spec.get(st.req_id, []) if k else []
        p = st.sampling_params
        # The output before row i includes the proposals before it (penalties, min_tokens count them).
        needs_history = (p.min_tokens or p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0
                         or p.presence_penalty != 0.0)
        for i in range(k + 1):
            params.append(p)
            outputs.append(st.output_token_ids + d[:i] if i and needs_history else st.output_token_ids)
            prompts.append(st.prompt_token_ids)
            eos.append(st.eos_token_ids)
        drafts.append(d)
    meta = SamplingMetadata.from_requests(params, outputs, prompts, eos, {}, logits.shape[-1], device, staging)
    if grammar is not None:
        meta.grammar_bitmask, meta.grammar_rows = grammar
    first_row = np.concatenate([[0], np.cumsum(np.asarray(num_drafts) + 1)[:-1]]).tolist()
    if meta.all_greedy and meta.max_num_logprobs is None:  # the greedy path (module docstring)
        greedy_ids, _ = processed_target(logits, meta)
        step = VerifiedStep(None, states, req_indices, first_row, greedy_ids=greedy_ids, drafts=drafts)
    else:
        layout = DraftLayout.build(num_drafts, device, staging)
        draft_ids = host_to_device(torch.tensor([t for d in drafts for t in d], dtype=torch.int64), device)
        res = rejection_sample(logits, meta, layout, draft_ids, draft_probs, generators)
        step = VerifiedStep(res.token_ids, states, req_indices, first_row, res.row_logprobs)
    if device.type == "cuda":
        result = step._device_result()
        step.host = torch.empty(result.shape, dtype=torch.int64, pin_memory=True)
        step.host.copy_(result, non_blocking=True)
        step.copied = torch.cuda.Event()
        step.copied.record()
    return step


def greedy_tokens(drafts: Sequence[int], argmaxes: Sequence[int]) -> list[int]:
    """A greedy request's tokens from its proposals and the argmax of each of its rows
    (len(drafts) + 1 of them): the proposals while each equals the argmax before it, then the
    argmax after the last kept one."""
    n = 0
    while n < len(drafts) and drafts[n] == argmaxes[n]:
        n += 1
    return list(argmaxes[: n + 1])
