"""The worker's own view of the requests it runs, kept up to date from ``ExecuteModelRequest``s.

The scheduler sends a request's data once (``NewRequestData``) and afterwards only what changed
(``CachedRequestData``: computed-token count, a new block table); the worker appends the tokens it
samples itself (with pipeline parallelism the other stages get them in ``new_token_ids``). A
sampled token is a placeholder until the step's result reaches the host
(``collect``); the next step, if launched before that (async scheduling), reads its value on the
device. Nothing here refers to the scheduler's objects, so the same code runs in another process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_engine.core.sched_output import ExecuteModelRequest, NewRequestData
from vllm_engine.engine.request import PLACEHOLDER_TOKEN_ID
from vllm_engine.sampling_params import SamplingParams
from vllm_engine.worker.block_tables import HostBlockTables


@dataclass(eq=False)
class CachedRequestState:
    """One request on the worker. ``token_ids`` = prompt + output; ``PLACEHOLDER_TOKEN_ID`` marks a
    sampled token whose value is still on the device."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    sample_index: int
    eos_token_ids: frozenset[int]
    num_computed_tokens: int
    token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    # Prompt logprobs are reported once: a request recomputed after preemption skips those done.
    num_prompt_logprobs_done: int = 0

    @classmethod
    def from_new(cls, data: NewRequestData) -> "CachedRequestState":
        return cls(data.req_id, data.prompt_token_ids, data.sampling_params, data.sample_index,
                   data.eos_token_ids, data.num_computed_tokens,
                   token_ids=list(data.prompt_token_ids) + list(data.output_token_ids),
                   output_token_ids=list(data.output_token_ids))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def append_placeholders(states: list[CachedRequestState]) -> list[int]:
    """Each state gets a placeholder for the token a launched step sampled for it; returns their
    indices in ``token_ids`` (for ``fill_placeholders``). Loops, not a method per state: this runs
    for every sampled request of every step."""
    index = [len(s.token_ids) for s in states]
    for s in states:
        s.token_ids.append(PLACEHOLDER_TOKEN_ID)
        s.output_token_ids.append(PLACEHOLDER_TOKEN_ID)
    return index


def fill_placeholders(states: list[CachedRequestState], index: list[int], token_ids: list[int]) -> None:
    """Writes the sampled ids (known on the host now) over the placeholders ``append_placeholders`` made."""
    for s, i, t in zip(states, index, token_ids):
        s.token_ids[i] = t
        s.output_token_ids[i - len(s.prompt_token_ids)] = t


class RequestStates:
    """The worker's requests by id, and their block-table rows (``HostBlockTables``)."""

    def __init__(self, host_tables: HostBlockTables) -> None:
        self.states: dict[str, CachedRequestState] = {}
        self.host_tables = host_tables

    def __len__(self) -> int:
        return len(self.states)

    def update(self, msg: ExecuteModelRequest) -> list[CachedRequestState]:
        """Applies one step's message; returns the scheduled requests' states in ``msg.req_ids`` order."""
        states, tables = self.states, self.host_tables
        for rid in msg.finished_req_ids:
            states.pop(rid, None)
        tables.release(msg.finished_req_ids)
        for data in msg.new_requests:
            states[data.req_id] = CachedRequestState.from_new(data)
            tables.write(data.req_id, data.block_ids)
        cached = msg.cached_requests
        for rid, num_computed, block_ids in zip(cached.req_ids, cached.num_computed_tokens, cached.block_ids):
            states[rid].num_computed_tokens = num_computed
            if block_ids is not None:
                tables.write(rid, block_ids)
        for rid, num_computed, token_ids in zip(cached.req_ids, cached.num_computed_tokens, cached.new_token_ids):
            _append_new_tokens(states[rid], num_computed, token_ids)
        return [states[rid] for rid in msg.req_ids]


def _append_new_tokens(state: CachedRequestState, start: int, token_ids: list[int]) -> None:
    """Pipeline parallelism: the step computes ``token_ids`` from index ``start``; those past the end
    of this rank's ``token_ids`` were sampled by the last stage and are new here (on the sampling
    rank itself they are already in place)."""
    new = token_ids[len(state.token_ids) - start:]
    if new:
        state.token_ids.extend(new)
        state.output_token_ids.extend(new)
