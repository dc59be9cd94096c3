"""Scheduler: continuous batching with one rule for every step (see docs/scheduler.md).

Each request's ``num_computed_tokens`` catches up to ``num_tokens`` under a per-step token budget
(``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``): running requests first (decodes
and continuing prompt chunks), then swapped-out requests, then waiting ones. No tensors here.
``schedule()`` never advances ``num_computed_tokens`` (the model runner reads it as the start of the
step's tokens); ``update_from_output()`` does.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Union

from vllm_engine.core.hybrid_kv_cache_manager import HybridKVCacheManager
from vllm_engine.core.kv_cache_manager import KVCacheManager, cdiv
from vllm_engine.core.sched_output import (
    CachedRequestData, ExecuteModelRequest, ModelRunnerOutput, NewRequestData, SchedulerOutput)
from vllm_engine.engine.request import PLACEHOLDER_TOKEN_ID
from vllm_engine.engine.request import Request, RequestStatus

if TYPE_CHECKING:  # config.py imports torch; the scheduler only reads plain fields
    from vllm_engine.config import CacheConfig, SchedulerConfig

_RUNNING = RequestStatus.RUNNING
_DEFER = (-1, -1)  # _admit: wait a step, the prefix this request needs is being computed right now


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    kv_cache_usage: float  # fraction of GPU blocks in use, 0..1
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # tokens looked up, cumulative
    prefix_cache_hits: int  # tokens found, cumulative
    num_preemptions_total: int
    num_swaps_total: int
    spec: Optional[SpecDecodeStats] = None  # speculative decoding counters (None: off)


@dataclass
class SpecDecodeStats:
    """Cumulative speculative-decoding counters, vLLM's meanings: a *draft* is one request's proposal
    in one step; ``accepted_per_position[i]``: drafts whose token i (0-based) was accepted."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verification step of a speculating request (accepted + the bonus/recovered one)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def snapshot(self) -> "SpecDecodeStats":
        """A copy (stats are read on other threads while the engine loop counts on)."""
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.accepted_per_position))

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_drafted:
            self.accepted_per_position.extend([0] * (num_drafted - len(self.accepted_per_position)))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1


class RequestQueue:
    """Requests in scheduling order: FCFS (a deque; preempted requests go back to the front) or
    priority (a heap on the scheduler's sort key, so preempted requests fall back into their place)."""

    def __init__(self, priority: bool, key: Callable[[Request], tuple]) -> None:
        self._priority = priority
        self._key = key
        self._deque: deque[Request] = deque()
        self._heap: list[tuple[tuple, Request]] = []

    def push(self, req: Request) -> None:
        if self._priority:
            heapq.heappush(self._heap, (self._key(req), req))
        else:
            self._deque.append(req)

    def push_front(self, req: Request) -> None:
        if self._priority:
            self.push(req)
        else:
            self._deque.appendleft(req)

    def peek(self) -> Request:
        return self._heap[0][1] if self._priority else self._deque[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[1] if self._priority else self._deque.popleft()

    def remove(self, req: Request) -> None:
        # O(n), only for aborts.
        if self._priority:
            self._heap = [e for e in self._heap if e[1] is not req]
            heapq.heapify(self._heap)
        else:
            self._deque.remove(req)

    def __len__(self) -> int:
        return len(self._heap) if self._priority else len(self._deque)

    def __iter__(self) -> Iterator[Request]:
        return (e[1] for e in self._heap) if self._priority else iter(self._deque)


_NO_CAP = 1 << 62  # a step's sequence cap when only max_num_seqs applies


class Scheduler:
    """Decides each step's requests and token counts under the budget (see docs/architecture.md).

    ``pipeline_depth`` > 1 (pipeline parallelism, one step in flight per stage): a request whose
    sampled token is still in flight is not scheduled again until ``resolve`` knows it, so the steps
    in flight are disjoint micro-batches; each step takes about 1/depth of the active requests, so
    the micro-batches stay balanced; and the step message carries the ids of the tokens each request
    computes (``CachedRequestData.new_token_ids``: the earlier stages never see the sampled ids).
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_gpu_blocks: int, num_cpu_blocks: int = 0, pipeline_depth: int = 1) -> None:
        self.config = scheduler_config
        self.pipeline_depth = pipeline_depth
        self.block_size = cache_config.block_size
        self.num_gpu_blocks = num_gpu_blocks
        groups = cache_config.kv_cache_groups
        if len(groups) > 1:  # sliding-window and full-attention layers: a block table per group
            self.kv_cache_manager: KVCacheManager = HybridKVCacheManager(
                num_gpu_blocks, cache_config.block_size, cache_config.enable_prefix_caching, num_cpu_blocks,
                [g.sliding_window for g in groups])
        else:
            self.kv_cache_manager = KVCacheManager(num_gpu_blocks, cache_config.block_size,
                                                   cache_config.enable_prefix_caching, num_cpu_blocks,
                                                   cache_config.sliding_window)
        self.priority_policy = scheduler_config.policy == "priority"
        self.swap_mode = scheduler_config.preemption_mode == "swap"
        self.requests: dict[str, Request] = {}
        self._keys: dict[str, tuple] = {}  # sort key: (priority?, arrival_time, admission number)
        self._counter = itertools.count()
        self.waiting = RequestQueue(self.priority_policy, self._key)
        self.swapped = RequestQueue(self.priority_policy, self._key)
        # Sorted by key: the last one is the first to preempt (latest arrival / worst priority).
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()
        # The block-table list each request's table was last sent to the workers from (a request
        # absent here is new to them; a different list object means the table was rebuilt).
        self._sent_tables: dict[str, list[int]] = {}
        self._capped: list[Request] = []  # finished inside schedule(), reported by the next update
        self.num_preemptions_total = 0
        self.num_swaps_total = 0
        # Per-step state of schedule().
        self._budget = 0
        self._seq_cap = _NO_CAP  # sequences in this step (a micro-batch, with a pipeline)
        self._sched_reqs: list[Request] = []
        self._sched_tokens: dict[str, int] = {}
        self._preempted_now: set[str] = set()
        # Speculative decoding: proposals for the next schedule() (set_proposals), those it scheduled.
        self._proposals: dict[str, list[int]] = {}
        self._sched_spec: dict[str, list[int]] = {}
        self.spec_stats: Optional[SpecDecodeStats] = None  # set by whoever proposes (the engine)

    def _key(self, req: Request) -> tuple:
        return self._keys[req.request_id]

    # ---- requests in -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queues a request (status WAITING). ValueError if its prompt plus one token can never fit the cache."""
        needed = self.kv_cache_manager.min_blocks_needed(request.num_prompt_tokens + 1)
        if needed > self.num_gpu_blocks:
            raise ValueError(
                f"The prompt ({request.num_prompt_tokens} tokens) needs {needed} KV cache blocks of "
                f"{self.block_size} tokens, but the KV cache has only {self.num_gpu_blocks} blocks.")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use.")
        seq = next(self._counter)
        self._keys[request.request_id] = ((request.priority, request.arrival_time, seq) if self.priority_policy
                                          else (request.arrival_time, seq))
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def finish_requests(self, request_ids: Union[str, Iterable[str]], status: RequestStatus) -> None:
        """Finishes requests in any state (abort, stop string); frees their blocks at once. Unknown ids are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        for rid in ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == _RUNNING:
                self.running.remove(req)
            elif req.status == RequestStatus.SWAPPED:
                self.swapped.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Marks finished, frees blocks (full ones stay in the prefix cache), forgets the request."""
        req.status = status
        self.kv_cache_manager.free(req)
        del self.requests[req.request_id]
        del self._keys[req.request_id]
        self._sent_tables.pop(req.request_id, None)
        self._finished_ids.add(req.request_id)

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        kv = self.kv_cache_manager
        kv.new_step()
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = set()
        self._budget = self.config.max_num_batched_tokens
        self._seq_cap = self._micro_batch_seqs()
        self._sched_reqs, self._sched_tokens, self._preempted_now = [], {}, set()
        self._sched_spec = {}

        self._schedule_running(out)
        if self._proposals:
            self._schedule_drafts()
        # After a preemption nothing new comes in: the freed blocks are what the running ones need.
        if not out.preempted_requests:
            self._schedule_swapped(out)
            # Swapped requests go before new ones, unless (priority policy) a new one ranks higher.
            if not len(self.swapped) or (self.priority_policy and len(self.waiting)
                                         and self._key(self.waiting.peek()) < self._key(self.swapped.peek())):
                self._schedule_waiting(out)

        out.scheduled_requests = self._sched_reqs
        out.num_scheduled_tokens = [self._sched_tokens[r.request_id] for r in self._sched_reqs]
        out.block_tables = [kv.get_block_ids(r) for r in self._sched_reqs]
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens)
        out.changed_block_tables = kv.take_changed_tables()
        out.blocks_to_copy = kv.take_pending_copies()
        out.blocks_to_swap_in = kv.take_swap_ins()
        out.spec_token_ids = self._sched_spec
        out.execute_model_request = self._execute_model_request(out)
        return out

    def _micro_batch_seqs(self) -> int:
        """The most sequences one step takes. Without a pipeline no cap of its own (max_num_seqs bounds
        the running requests, and a priority admission may preempt to make room); with one, a 1/depth
        share of the active requests, so that depth steps in flight split them evenly."""
        max_seqs = self.config.max_num_seqs
        if self.pipeline_depth == 1:
            return _NO_CAP
        active = min(max_seqs, len(self.running) + len(self.waiting) + len(self.swapped))
        return max(1, -(-active // self.pipeline_depth))

    def _in_flight(self, req: Request) -> bool:
        """With a pipeline: the request's last sampled token is not known yet (its step is in flight)."""
        return self.pipeline_depth > 1 and bool(req.output_token_ids) and req.output_token_ids[-1] == PLACEHOLDER_TOKEN_ID

    def _execute_model_request(self, out: SchedulerOutput) -> ExecuteModelRequest:
        """The step as the workers see it: new requests in full, the others' changes only.

        Runs for every request of every step on the host's critical path, so the common case (every
        request known to the workers, few tables changed) is a few list comprehensions."""
        reqs, tables, sent = out.scheduled_requests, out.block_tables, self._sent_tables
        req_ids = [r.request_id for r in reqs]
        new: list[NewRequestData] = []
        if not sent.keys() >= set(req_ids):
            for req, ids in zip(reqs, tables):
                if req.request_id not in sent:
                    new.append(NewRequestData(
                        req.request_id, req.prompt_token_ids, list(req.output_token_ids), req.sampling_params,
                        req.sample_index, frozenset(req.eos_token_ids), self.kv_cache_manager.copy_block_ids(ids),
                        req.num_computed_tokens))
                    sent[req.request_id] = ids
            new_ids = {d.req_id for d in new}
            known = [i for i, rid in enumerate(req_ids) if rid not in new_ids]
            reqs, tables = [reqs[i] for i in known], [tables[i] for i in known]
        cached_ids = [r.request_id for r in reqs] if new else req_ids
        changed = out.changed_block_tables
        block_ids = [None if sent[rid] is ids and rid not in changed else self._resend(rid, ids)
                     for rid, ids in zip(cached_ids, tables)]
        cached = CachedRequestData(cached_ids, [r.num_computed_tokens for r in reqs], block_ids)
        if self.pipeline_depth > 1:
            n = self._sched_tokens
            cached.new_token_ids = [r.all_token_ids[r.num_computed_tokens: r.num_computed_tokens + n[r.request_id]]
                                    for r in reqs]
        return ExecuteModelRequest(
            req_ids=req_ids, num_scheduled_tokens=out.num_scheduled_tokens,
            total_num_scheduled_tokens=out.total_num_scheduled_tokens, new_requests=new, cached_requests=cached,
            blocks_to_copy=out.blocks_to_copy, blocks_to_swap_out=out.blocks_to_swap_out,
            blocks_to_swap_in=out.blocks_to_swap_in, finished_req_ids=out.finished_request_ids,
            spec_token_ids=out.spec_token_ids)

    def _resend(self, request_id: str, block_ids: list[int]) -> list[int]:
        """A table the workers must get again (changed in place, or rebuilt): a copy of it."""
        self._sent_tables[request_id] = block_ids
        return self.kv_cache_manager.copy_block_ids(block_ids)

    def _add_scheduled(self, req: Request, num_tokens: int) -> None:
        self._sched_reqs.append(req)
        self._sched_tokens[req.request_id] = num_tokens
        self._budget -= num_tokens

    def _schedule_running(self, out: SchedulerOutput) -> None:
        kv = self.kv_cache_manager
        pipelined = self.pipeline_depth > 1  # (no method call per request per step without a pipeline)
        i = 0
        while i < len(self.running) and self._budget > 0 and len(self._sched_reqs) < self._seq_cap:
            req = self.running[i]
            # finish_pending: its last token is in flight and ends it
            if req.finish_pending or (pipelined and self._in_flight(req)):
                i += 1
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, self._budget)
            while kv.allocate_slots(req, num_new) is None:
                if len(self.running) == 1:  # alone and still too big: the cache can never hold it
                    self.running.clear()
                    self._cap(req)
                    return
                victim = self.running[-1]  # never one scheduled already: those are before index i
                self._preempt(victim, out)
                if victim is req:
                    return  # it was the last running request
            self._add_scheduled(req, num_new)
            i += 1

    def set_proposals(self, proposals: dict[str, list[int]]) -> None:
        """Proposed tokens per request id for the next ``schedule()`` only (speculative decoding):
        each follows the request's tokens (all known, none a placeholder)."""
        self._proposals = proposals

    def _schedule_drafts(self) -> None:
        """Adds the proposals of running requests scheduled up to their last token, as extra tokens
        to compute, while the budget and free blocks allow (a proposal is cut short, never a reason
        to preempt). Their K/V lands in the request's own blocks after ``num_computed_tokens``;
        ``resolve`` counts only the verified ones as computed."""
        proposals, self._proposals = self._proposals, {}
        kv = self.kv_cache_manager
        for req in self._sched_reqs:
            drafts = proposals.get(req.request_id)
            if self._budget <= 0:
                break
            n = self._sched_tokens[req.request_id]
            if not drafts or n != req.num_tokens - req.num_computed_tokens:
                continue
            drafts = drafts[: self._budget]
            if kv.allocate_slots(req, n + len(drafts)) is None:
                continue
            self._sched_tokens[req.request_id] = n + len(drafts)
            self._budget -= len(drafts)
            self._sched_spec[req.request_id] = drafts

    def _schedule_swapped(self, out: SchedulerOutput) -> None:
        kv = self.kv_cache_manager
        while (len(self.swapped) and self._budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(self._sched_reqs) < self._seq_cap):
            req = self.swapped.peek()
            if self._in_flight(req):
                break
            num_new = min(req.num_tokens - req.num_computed_tokens, self._budget)
            if not kv.can_swap_in(req, num_new):
                break
            self.swapped.pop()
            kv.swap_in(req)
            allocated = kv.allocate_slots(req, num_new)
            assert allocated is not None, "can_swap_in promised room for the new tokens"
            req.status = _RUNNING
            bisect.insort(self.running, req, key=self._key)
            self._add_scheduled(req, num_new)

    def _schedule_waiting(self, out: SchedulerOutput) -> None:
        # n > 1 samples waiting for their sibling's prompt, requests whose grammar is compiling: they block nobody
        skipped: list[Request] = []
        while len(self.waiting) and self._budget > 0 and len(self._sched_reqs) < self._seq_cap:
            req = self.waiting.peek()
            if req.request_id in self._preempted_now:
                break  # do not bring back a request preempted for a better one in this very step
            if req.grammar_future is not None and not req.grammar_future.done():
                skipped.append(self.waiting.pop())  # its grammar is compiling: the others go ahead
                continue
            if self._in_flight(req):  # preempted while its step is in flight (pipeline): after it
                skipped.append(self.waiting.pop())
                continue
            parent = req.fork_from
            if parent is not None:
                ready = parent.status == _RUNNING and parent.num_computed_tokens >= parent.num_prompt_tokens
                if not ready and parent.status in (RequestStatus.WAITING, _RUNNING):
                    skipped.append(self.waiting.pop())
                    continue
                if not ready or not self.kv_cache_manager.can_fork(parent, req.num_prompt_tokens - 1):
                    # The sibling finished or was preempted first, or its window moved past the prompt's
                    # last blocks: compute the prompt itself.
                    req.fork_from = parent = None
            if len(self.running) >= self.config.max_num_seqs:
                if self._preempt_for(req, out):
                    continue
                break
            admitted = self._admit_fork(req, parent) if parent is not None else self._admit(req)
            if admitted is _DEFER:
                skipped.append(self.waiting.pop())
                continue
            if admitted is None:
                if self._preempt_for(req, out):
                    continue
                if not self.running:  # nothing else holds blocks: it can never fit
                    self._cap(self.waiting.pop())
                    continue
                break
            num_new, num_cached = admitted
            self.waiting.pop()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                req.first_scheduled_time = time.time()
            req.status = _RUNNING
            bisect.insort(self.running, req, key=self._key)
            self._add_scheduled(req, num_new)
        for req in reversed(skipped):
            self.waiting.push_front(req)

    def _admit(self, req: Request) -> Optional[tuple[int, int]]:
        """Prefix-cache lookup and block allocation for a waiting request: (tokens to compute, cached tokens)."""
        kv = self.kv_cache_manager
        blocks, num_hit = kv.get_computed_blocks(req)
        if self._prefix_being_computed(req, num_hit):
            return _DEFER
        num_new = min(req.num_tokens - num_hit, self._budget)
        if kv.allocate_slots(req, num_new, blocks) is None:
            return None
        req.num_computed_tokens = num_hit
        return num_new, num_hit

    def _prefix_being_computed(self, req: Request, num_hit: int) -> bool:
        """True when a request scheduled this step is computing the very block that would extend
        ``req``'s prefix-cache hit: ``req`` then waits a step and reuses it instead of computing the
        same prefix again (many requests with one system prompt arriving together)."""
        if not self.kv_cache_manager.enable_caching:
            return False
        end = num_hit + self.block_size
        tokens = req.all_token_ids
        if end > len(tokens) - 1:  # the hit is capped to leave a token to compute anyway
            return False
        for other in self._sched_reqs:
            if other.num_computed_tokens < end <= other.num_tokens and other.all_token_ids[:end] == tokens[:end]:
                return True
        return False

    def _admit_fork(self, req: Request, parent: Request) -> Optional[tuple[int, int]]:
        """Sample i > 0 of an n > 1 request: share the sibling's prompt blocks but for the last prompt token,
        which it computes itself to sample its own first token."""
        kv = self.kv_cache_manager
        num_shared = req.num_prompt_tokens - 1
        kv.fork(req, parent, num_shared)
        req.num_computed_tokens = num_shared
        if kv.allocate_slots(req, 1) is None:
            kv.free(req)
            req.num_computed_tokens = 0
            return None
        req.fork_from = None
        return 1, num_shared

    def _preempt_for(self, req: Request, out: SchedulerOutput) -> bool:
        """Priority policy: preempt the worst running request if ``req`` has a strictly better priority."""
        if not self.priority_policy or not self.running or self.running[-1].priority <= req.priority:
            return False
        self._preempt(self.running[-1], out)
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Swap the request out (swap mode, if CPU space allows) or free its blocks to recompute it later."""
        kv = self.kv_cache_manager
        if self.running[-1] is req:
            self.running.pop()
        else:
            self.running.remove(req)
        n = self._sched_tokens.pop(req.request_id, None)
        self._sched_spec.pop(req.request_id, None)
        if n is not None:  # scheduled earlier in this step: take it back
            self._sched_reqs.remove(req)
            self._budget += n
        mapping = kv.swap_out(req) if self.swap_mode else None
        if mapping is not None:
            req.status = RequestStatus.SWAPPED
            self.swapped.push(req)
            out.blocks_to_swap_out.extend(mapping)
            out.num_swaps += 1
            self.num_swaps_total += 1
        else:
            kv.free(req)
            req.num_computed_tokens = 0  # output tokens are kept: resuming recomputes prompt + outputs
            req.status = RequestStatus.PREEMPTED
            self.waiting.push_front(req)
        req.num_preemptions += 1
        out.num_preemptions += 1
        self.num_preemptions_total += 1
        out.preempted_requests.append(req)
        self._preempted_now.add(req.request_id)

    def _cap(self, req: Request) -> None:
        """Ends a request whose sequence outgrew the whole KV cache (it keeps the tokens it has)."""
        self._finish(req, RequestStatus.FINISHED_LENGTH_CAPPED)
        self._capped.append(req)

    # ---- results -----------------------------------------------------------------------------
    def update_from_output(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[Request]:
        """Advances num_computed_tokens, caches full blocks, appends sampled tokens and applies the
        token-level stop checks. Returns the requests that got a token or finished."""
        self.advance(sched_out)
        return self.resolve(sched_out, runner_out)

    def advance(self, sched_out: SchedulerOutput) -> None:
        """The step's tokens are computed: advance num_computed_tokens and cache full blocks; a request
        that samples this step gets a placeholder token, filled in by ``resolve``.

        Async scheduling calls this right after launching the step, so the next ``schedule()`` can run
        while the GPU works; the placeholder's real value reaches the GPU inputs directly.
        """
        # This loop runs over every scheduled request of every step (256 at a full batch) on the host's
        # critical path: it reads plain attributes rather than the Request properties, and asks the KV
        # manager to cache blocks only when a block has filled up since it last did (1 step in 16 of a decode).
        kv = self.kv_cache_manager
        caching = kv.enable_caching
        num_cached = kv.num_cached_blocks
        bs = self.block_size
        pending: list[tuple[int, Request]] = []
        max_len = self.config.max_model_len
        counts = sched_out.num_scheduled_tokens
        if sched_out.spec_token_ids:  # proposed tokens are computed only once verified (resolve)
            spec = sched_out.spec_token_ids
            counts = [c - len(spec.get(r.request_id, ())) for c, r in zip(counts, sched_out.scheduled_requests)]
        for i, req in enumerate(sched_out.scheduled_requests):
            if req.status != _RUNNING:
                continue  # finished (aborted) after schedule()
            computed = req.num_computed_tokens + counts[i]
            req.num_computed_tokens = computed
            if caching and computed // bs > num_cached.get(req.request_id, 0):
                kv.cache_blocks(req, computed)
            tokens = req.all_token_ids
            if computed < len(tokens):
                continue  # a prompt chunk: nothing sampled
            req.output_token_ids.append(PLACEHOLDER_TOKEN_ID)
            tokens.append(PLACEHOLDER_TOKEN_ID)
            if len(req.output_token_ids) >= req.max_tokens or len(tokens) >= max_len:
                req.finish_pending = True
            pending.append((i, req))
        sched_out.sampled_requests = pending

    def resolve(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[Request]:
        """Fills in the step's sampled tokens and applies the stop checks (see ``advance``)."""
        updated, self._capped = self._capped, []
        sampled = runner_out.sampled_token_ids
        any_finished = False
        for i, req in sched_out.sampled_requests:
            tokens = sampled[i]
            if req.is_finished():
                # Ended while this step was in flight (aborted, stopped, or capped by the next step's
                # schedule): it keeps the token the step sampled for it, and nothing more.
                if req.output_token_ids and req.output_token_ids[-1] == PLACEHOLDER_TOKEN_ID and tokens:
                    req.set_last_output_token(tokens[0])
                continue
            req.set_last_output_token(tokens[0])
            status = self._check_stop(req, tokens[0])
            if len(tokens) > 1 and status is None:
                status = self._append_tokens(req, tokens)
            if status is not None:
                if req.status == _RUNNING:
                    self._finish(req, status)
                    any_finished = True
                else:  # preempted (by the next step's schedule) before its token was known
                    stop_reason = req.stop_reason
                    self.finish_requests([req.request_id], status)
                    req.stop_reason = stop_reason
            updated.append(req)
        if any_finished:
            self.running = [r for r in self.running if r.status == _RUNNING]
        if sched_out.spec_token_ids:
            self._commit_verified(sched_out, sampled)
        return updated

    def _commit_verified(self, sched_out: SchedulerOutput, sampled: list[list[int]]) -> None:
        """A step that verified proposals gave request i ``sampled[i]``: its accepted proposals, then
        one more token. The accepted ones' K/V was written by that step at their positions (they equal
        the proposals), so they count as computed, and their full blocks go to the prefix cache; the
        rejected ones' K/V stays in slots after ``num_computed_tokens``, overwritten by the next step
        and never cached. Only a request still running (every token kept) is advanced."""
        spec, stats, kv = sched_out.spec_token_ids, self.spec_stats, self.kv_cache_manager
        for i, req in sched_out.sampled_requests:
            drafts = spec.get(req.request_id)
            if drafts is None:
                continue
            num_accepted = max(0, len(sampled[i]) - 1)
            if stats is not None:
                stats.observe(len(drafts), num_accepted)
            if req.status == _RUNNING and num_accepted:
                req.num_computed_tokens += num_accepted
                assert req.num_computed_tokens == req.num_tokens - 1, f"{req}: verified tokens out of step"
                kv.cache_blocks(req, req.num_computed_tokens)

    def _append_tokens(self, req: Request, tokens: list[int]) -> Optional[RequestStatus]:
        """The tokens after the first of a step that gave several (verified proposals): appended in
        order until one ends the request; the ones after it are dropped. They are computed (their
        K/V written) by a later step, like any token past ``num_computed_tokens``."""
        for token in tokens[1:]:
            req.append_output_token_ids(token)
            status = self._check_stop(req, token)
            if status is not None:
                return status
        return None

    def _check_stop(self, req: Request, token: int) -> Optional[RequestStatus]:
        params = req.sampling_params
        n_out = req.num_output_tokens
        if token in req.eos_token_ids and not params.ignore_eos and n_out > params.min_tokens:
            return RequestStatus.FINISHED_STOPPED
        if params.stop_token_ids and token in params.stop_token_ids and n_out > params.min_tokens:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if n_out >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

    # ---- queries -----------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Optional[Request]:
        return self.requests.get(request_id)

    def reset_prefix_cache(self) -> None:
        self.kv_cache_manager.reset_prefix_cache()

    def get_stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting), num_swapped=len(self.swapped),
            kv_cache_usage=kv.usage, num_free_blocks=kv.num_free_blocks, num_total_blocks=self.num_gpu_blocks,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions_total=self.num_preemptions_total, num_swaps_total=self.num_swaps_total,
            spec=self.spec_stats.snapshot() if self.spec_stats is not None else None)

    def snapshot(self) -> dict:
        """A read-only, JSON-ready view of the queues and the KV blocks (the server's /dashboard); call it
        between steps on the thread that steps. ``blocks``: one character per GPU block, ``.`` free, ``c``
        free but still holding a cached prefix block, ``u`` held by one request, ``s`` shared by several
        (a common prefix); each request lists the blocks of its table (window-freed entries left out)."""
        kv = self.kv_cache_manager
        queue_of = {r.request_id: "running" for r in self.running}
        queue_of.update((r.request_id, "swapped") for r in self.swapped)
        requests = [{
            "id": r.request_id, "queue": queue_of.get(r.request_id, "waiting"), "priority": r.priority,
            "arrival_time": r.arrival_time, "prompt_tokens": r.num_prompt_tokens,
            "computed_tokens": r.num_computed_tokens, "output_tokens": r.num_output_tokens,
            "max_tokens": r.max_tokens, "cached_tokens": max(r.num_cached_tokens, 0), "preemptions": r.num_preemptions,
            "blocks": kv.live_block_ids(r),
        } for r in self.requests.values()]
        states = "".join(("u" if b.ref_cnt == 1 else "s") if b.ref_cnt else ("c" if b.block_hash is not None else ".")
                         for b in kv.pool.blocks)
        return {"block_size": self.block_size, "num_blocks": self.num_gpu_blocks, "blocks": states,
                "num_cpu_blocks": kv.num_cpu_blocks, "num_free_cpu_blocks": kv.num_free_cpu_blocks,
                "requests": requests, "num_preemptions_total": self.num_preemptions_total,
                "num_swaps_total": self.num_swaps_total}

    def check_integrity(self) -> None:
        """AssertionError on a leaked or double-counted block, or a request in the wrong queue or state."""
        kv = self.kv_cache_manager
        kv.check_integrity()
        groups = {
            "running": (self.running, (_RUNNING,)),
            "waiting": (list(self.waiting), (RequestStatus.WAITING, RequestStatus.PREEMPTED)),
            "swapped": (list(self.swapped), (RequestStatus.SWAPPED,)),
        }
        seen: set[str] = set()
        for name, (reqs, statuses) in groups.items():
            for r in reqs:
                assert r.status in statuses, f"{r} in {name}"
                assert r.request_id not in seen, f"{r} queued twice"
                assert self.requests.get(r.request_id) is r, f"{r} in {name} but unknown"
                seen.add(r.request_id)
                if name == "running":
                    held = kv.num_table_entries(r) * self.block_size  # table entries (freed by a window too)
                    assert held >= r.num_computed_tokens, f"{r}: blocks cover only {held} tokens"
                elif name == "waiting":
                    assert kv.num_blocks_held(r) == 0 and r.request_id not in kv.swapped_blocks, f"{r} holds blocks"
                else:
                    assert kv.num_blocks_held(r) == 0 and r.request_id in kv.swapped_blocks, f"{r} not on CPU"
        assert seen == set(self.requests), "a request is in no queue"
        assert set(kv.req_blocks) <= {r.request_id for r in self.running}, "blocks held by a request not running"
        assert len(self.running) <= self.config.max_num_seqs
        keys = [self._key(r) for r in self.running]
        assert keys == sorted(keys), "running list out of order"
