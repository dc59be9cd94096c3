"""The model runner's side of a step that verifies proposals (``ExecuteModelRequest.spec_token_ids``).

Such a step computes, for a request with k proposed tokens, its last token and the k proposals as
k + 1 query tokens in the same forward as everything else (a multi-token query, as a prompt chunk
is); the logits of those k + 1 rows go through ``rejection_sample``. Requests without proposals in
the same step are sampled the same way with k = 0 (their one row: the target's distribution).
The step's tokens reach the worker's request states in ``VerifiedStep.write`` (from
``ModelRunner.collect``): the engine never launches a step while one with proposals is in flight,
so no placeholder stands for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from vllm_engine.core.sched_output import ModelRunnerOutput, SampledLogprobs
from vllm_engine.layers.sampler import SamplingMetadata
from vllm_engine.spec_decode.rejection_sampler import DraftLayout, rejection_sample
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
    """A launched verification: its tokens on the device until ``write`` reads them."""

    token_ids: torch.Tensor  # [B, K + 1] int64, -1 past each request's tokens
    states: list["CachedRequestState"]
    req_indices: list[int]  # index in the step's req_ids of each verified request
    first_row: list[int]  # its first row among the step's verified rows
    row_logprobs: Optional[list[SampledLogprobs]] = None
    host: Optional[torch.Tensor] = None  # pinned copy (CUDA), valid once `copied` completed
    copied: Optional[torch.cuda.Event] = None
    wait_s: float = 0.0
    done: bool = field(default=False)

    def write(self, out: ModelRunnerOutput) -> None:
        """Each request's tokens (and logprobs) into ``out``, and appended to its worker state."""
        if self.done:
            return
        self.done = True
        t0 = time.perf_counter()
        if self.copied is not None:
            self.copied.synchronize()
            rows = self.host.tolist()
        else:
            rows = self.token_ids.tolist()
        self.wait_s = time.perf_counter() - t0
        for b, (st, i) in enumerate(zip(self.states, self.req_indices)):
            tokens = [t for t in rows[b] if t >= 0]
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
    params, outputs, prompts, eos, drafts = [], [], [], [], []
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
        drafts.extend(d)
    meta = SamplingMetadata.from_requests(params, outputs, prompts, eos, {}, logits.shape[-1], device, staging)
    if grammar is not None:
        meta.grammar_bitmask, meta.grammar_rows = grammar
    layout = DraftLayout.build(num_drafts, device, staging)
    draft_ids = host_to_device(torch.tensor(drafts, dtype=torch.int64), device)
    res = rejection_sample(logits, meta, layout, draft_ids, draft_probs, generators)
    first_row = np.concatenate([[0], np.cumsum(np.asarray(num_drafts) + 1)[:-1]]).tolist()
    step = VerifiedStep(res.token_ids, states, req_indices, first_row, res.row_logprobs)
    if device.type == "cuda":
        step.host = torch.empty(res.token_ids.shape, dtype=torch.int64, pin_memory=True)
        step.host.copy_(res.token_ids, non_blocking=True)
        step.copied = torch.cuda.Event()
        step.copied.record()
    return step
