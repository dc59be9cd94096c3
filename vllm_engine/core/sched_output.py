"""The messages between the scheduler and the model runner.

``SchedulerOutput`` is the scheduler's own record of a step (it holds its live ``Request`` objects).
What crosses to the workers is ``ExecuteModelRequest``: plain, picklable data. A request's data goes
once, when the worker first sees it (``NewRequestData``); afterwards a step sends only what changed
(``CachedRequestData``). Workers keep their own request state (``worker/request_states.py``),
append the tokens they sample, and drop a request when it is in ``finished_req_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vllm_engine.engine.request import Request
from vllm_engine.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the workers have not seen: everything they need to compute and sample it."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    sample_index: int  # sample i of an n > 1 request draws with seed + i
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """Per-step changes of requests the workers know, one entry per request in ``req_ids`` order.

    ``block_ids[i]``: the request's whole new block table when it changed (a block appended, a
    copy-on-write replacement, a table rebuilt after preemption or swap-in), else None.
    ``num_computed_tokens[i]`` drops back to 0 when a preempted request is recomputed.
    ``new_token_ids[i]`` (pipeline parallelism only, else empty): the ids of the tokens this step
    computes for the request, from ``num_computed_tokens[i]`` on; the ranks that do not sample (the
    earlier stages) learn the sampled tokens from it.
    """

    req_ids: list[str] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    block_ids: list[Optional[list[int]]] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)


@dataclass
class ExecuteModelRequest:
    """One step for the workers: run ``req_ids[i]`` over ``num_scheduled_tokens[i]`` tokens from its
    ``num_computed_tokens``; sample it when that reaches its last token. The block copies and swaps
    are carried out before the forward pass; ``finished_req_ids`` are forgotten first."""

    req_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    total_num_scheduled_tokens: int = 0
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: CachedRequestData = field(default_factory=CachedRequestData)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    finished_req_ids: set[str] = field(default_factory=set)
    # Speculative decoding: request id -> the proposed tokens this step computes after its last token
    # (the last ``len(...)`` of its ``num_scheduled_tokens``), verified by the sampler. Empty: none.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class SchedulerOutput:
    """What to compute in one step.

    ``scheduled_requests[i]`` computes tokens
    ``all_token_ids[num_computed_tokens : num_computed_tokens + num_scheduled_tokens[i]]``
    at those positions, writing their K/V into ``block_tables[i]`` (the request's full block table).
    A request is sampled when this reaches its last token (not for a partial prefill chunk).
    The copy and swap lists are carried out by the model runner *before* the forward pass.
    """

    scheduled_requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    total_num_scheduled_tokens: int = 0
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) GPU blocks, copy-on-write
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu block, cpu block)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu block, gpu block)
    preempted_requests: list[Request] = field(default_factory=list)
    # Requests finished (or aborted) since the last step: the workers drop their per-request state.
    finished_request_ids: set[str] = field(default_factory=set)
    # Requests whose block-table lists changed in place (a block appended, or replaced by its copy)
    # since the last step (a rebuilt table is a new list): the workers get these tables again.
    changed_block_tables: set[str] = field(default_factory=set)
    num_preemptions: int = 0  # this step
    num_swaps: int = 0  # swap-outs this step
    # Speculative decoding: request id -> its proposed tokens in this step (the last ones it computes).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Filled by Scheduler.advance: (index in scheduled_requests, request) of each request sampled this step.
    sampled_requests: list[tuple[int, Request]] = field(default_factory=list)
    # What the workers get for this step (built by Scheduler.schedule).
    execute_model_request: ExecuteModelRequest = field(default_factory=ExecuteModelRequest)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class SampledLogprobs:
    """Logprobs of one generated position: the sampled token and the top-N alternatives."""

    sampled_logprob: float
    sampled_rank: int  # 1-based rank of the sampled token
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    """What one step produced, in the order of ``SchedulerOutput.scheduled_requests``.

    ``sampled_token_ids[i]`` and ``logprobs[i]`` are lists so that one step can give a request
    several tokens; the scheduler takes them in order and stops at the first that ends the request.
    """

    req_ids: list[str] = field(default_factory=list)
    # The tokens each request got this step, oldest first: one for a plain step, several when a
    # step verifies proposed tokens (speculative decoding), none for a partial prompt chunk.
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    # Their logprobs, one entry per sampled token; empty where the request asked for none.
    logprobs: list[list[SampledLogprobs]] = field(default_factory=list)
    # request id -> per prompt position computed this step: (token id, logprob, rank, top ids, top logprobs)
    prompt_logprobs: dict[str, list[Optional[SampledLogprobs]]] = field(default_factory=dict)
    # request id -> what went wrong in that request's own part of the step (e.g. its generator's
    # seeding); its sampled token is meaningless and the engine ends it with an error.
    failed: dict[str, str] = field(default_factory=dict)
