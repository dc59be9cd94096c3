"""Request: one sequence as the scheduler sees it (token ids and counts, never tensors).

A user request with ``n > 1`` becomes ``n`` Requests (one per sample) that share the prompt's
KV blocks: the first one computes the prompt, the others ``fork`` from it (see KVCacheManager).
"""

from __future__ import annotations

import enum
import time
from typing import Optional

from vllm_engine.sampling_params import SamplingParams


# Stands for a sampled token that is still on the GPU (async scheduling); never a real token id.
PLACEHOLDER_TOKEN_ID = -1


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # blocks freed, waits to recompute
    SWAPPED = 3  # blocks moved to CPU swap space, waits to swap back in
    # Everything from here on is finished.
    FINISHED_STOPPED = 10  # EOS, stop token id or stop string
    FINISHED_LENGTH_CAPPED = 11  # max_tokens or max_model_len
    FINISHED_ABORTED = 12  # client gone, user abort
    FINISHED_IGNORED = 13  # rejected (prompt can never fit)
    FINISHED_ERROR = 14  # a fault in this request's own path (its sampling setup, detokenization, stop check)

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status >= RequestStatus.FINISHED_STOPPED

    @staticmethod
    def finish_reason(status: "RequestStatus") -> Optional[str]:
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_IGNORED: "length",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: Optional[set[int]] = None,
        arrival_time: Optional[float] = None,
        priority: int = 0,
        parent_id: Optional[str] = None,
        sample_index: int = 0,
        fork_from: Optional["Request"] = None,
        max_tokens: Optional[int] = None,
    ) -> None:
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.sample_index = sample_index
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = set(eos_token_ids or ())
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.priority = priority
        # For samples 1..n-1 of an n > 1 request: wait until this sibling has computed the prompt,
        # then share its KV blocks instead of computing the prompt again.
        self.fork_from = fork_from
        # The resolved output cap: min(params.max_tokens, max_model_len - prompt length).
        self.max_tokens = max_tokens if max_tokens is not None else (sampling_params.max_tokens or 2**31)

        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self._all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit (tokens) at first scheduling; -1: not yet scheduled
        self.num_preemptions = 0
        self.stop_reason: Optional[int | str] = None
        # Prefix caching: hashes of this request's full blocks, filled as blocks fill up.
        self.block_hashes: list = []
        self.first_scheduled_time: Optional[float] = None
        # Async scheduling: the last output token may be a placeholder (PLACEHOLDER_TOKEN_ID) until the
        # step that samples it is resolved; finish_pending marks a request whose placeholder is its last token
        # (max_tokens / max_model_len reached), so it is not scheduled again.
        self.finish_pending = False
        # Structured outputs: the compile of this request's grammar (a Future); the scheduler leaves the
        # request waiting until it is done.
        self.grammar_future = None

    # ---- token bookkeeping -------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output tokens. Read-only view: do not mutate."""
        return self._all_token_ids

    def append_output_token_ids(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def set_last_output_token(self, token_id: int) -> None:
        """Fills in the placeholder appended when the token's step was launched (async scheduling)."""
        self.output_token_ids[-1] = token_id
        self._all_token_ids[-1] = token_id

    # ---- status ------------------------------------------------------------------------------
    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finish_reason(self) -> Optional[str]:
        return RequestStatus.finish_reason(self.status)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
