"""Engine: the synchronous step loop and the offline API (``Engine(...).generate(...)``).

One step is ``schedule() -> execute_model() -> update_from_output() -> process outputs``; see
``step()``. Everything here runs on one thread; ``engine/async_engine.py`` drives it for the server.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from vllm_engine.config import EngineArgs, EngineConfig
from vllm_engine.core.scheduler import Scheduler, SpecDecodeStats
from vllm_engine.engine.output_processor import OutputProcessor
from vllm_engine.engine.request import PLACEHOLDER_TOKEN_ID, Request, RequestStatus
from vllm_engine.executor import Executor
from vllm_engine.layers import parallel_compile
from vllm_engine.outputs import RequestOutput
from vllm_engine.sampling_params import SamplingParams, SamplingParamsError
from vllm_engine.utils import StartupPhases
from vllm_engine.worker.model_runner import ModelRunner
from vllm_engine.worker.startup_cache import is_first_start, use_triton_cache

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int], dict]


def _needs_host_tokens(params: SamplingParams) -> bool:
    """Sampling that reads the previous tokens' values on the host (penalties)."""
    return (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0)


def _nothing_to_do(sched_out) -> bool:
    """An empty step that carries no bookkeeping for the workers either (finished ids, block moves)."""
    return (sched_out.is_empty and not sched_out.finished_request_ids and not sched_out.blocks_to_swap_out
            and not sched_out.blocks_to_swap_in and not sched_out.blocks_to_copy)


class QueueFullError(RuntimeError):
    """Too many requests are waiting (``max_waiting_requests``): try again later (HTTP 503)."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions_total: int
    num_swaps_total: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    spec_decode: Optional[SpecDecodeStats] = None  # speculative decoding counters (None: off)


def _compiles_many_here(args: EngineArgs) -> bool:
    """Whether this engine will run its one rank in this process on a GPU, on its first start there
    (then start-up's many Triton compiles happen here: layers/parallel_compile.py)."""
    if args.tensor_parallel_size * args.pipeline_parallel_size != 1 or args.distributed_executor_backend not in (
            None, "uni") or args.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available() and (not args.startup_cache or is_first_start(torch.device("cuda")))


class Engine:
    """An LLM engine: ``Engine(model=...)`` takes every ``EngineArgs`` field as a keyword argument."""

    def __init__(self, model: Optional[str] = None, **kwargs: Any) -> None:
        self._build(EngineArgs(model=model, **kwargs))

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "Engine":
        engine = cls.__new__(cls)
        engine._build(args)
        return engine

    def _build(self, args: EngineArgs) -> None:
        """Start-up, its phases timed (``startup_seconds``: this process's, and the in-process rank's)."""
        t0 = time.perf_counter()
        phases = StartupPhases(logger)
        if _compiles_many_here(args):  # the compile workers import while the config loads
            use_triton_cache(args.startup_cache)  # before the workers start: they inherit it
            parallel_compile.start_workers()
        try:
            with phases("config"):
                config = args.create_engine_config()
            self._init(config, phases)  # its model runner ends the workers after its warm-ups
        except BaseException:
            parallel_compile.stop_workers()
            raise
        if self.model_runner is not None:  # the in-process rank's own phases, inside "ranks (...)"
            phases.seconds.update({f"rank 0: {k}": v for k, v in self.model_runner.startup.seconds.items()})
        self.startup_seconds = dict(phases.seconds, total=time.perf_counter() - t0)

    def _init(self, config: EngineConfig, phases: StartupPhases) -> None:
        from vllm_engine.model_loader.tokenizer import get_eos_token_ids, get_tokenizer

        self.config = config
        self.model_config = config.model
        self.max_model_len = config.model.max_model_len
        self.served_model_name = config.model.served_model_name
        self.generation_config = dict(config.model.generation_config)
        with phases("tokenizer"):
            self.tokenizer = get_tokenizer(config.model) if config.model.tokenizer else None
        self.eos_token_ids = set(get_eos_token_ids(self.tokenizer, config.model.hf_config, self.generation_config))
        t0 = time.time()
        # One rank in this process, or one process per rank (under torchrun, Executor.create serves
        # rank 0 in every other process and never returns there).
        with phases("ranks (model and weights)"):
            self.executor = Executor.create(config)
        try:
            with phases("ranks (KV cache, graphs, warm-ups)"):
                num_gpu_blocks, num_cpu_blocks = self.executor.initialize()  # the minimum over ranks
        except BaseException:
            self.executor.shutdown()
            raise
        # The in-process ModelRunner (uni; torchrun's rank 0), for tests and benchmarks; None under mp.
        self.model_runner: Optional[ModelRunner] = self.executor.model_runner
        # Pipeline parallelism keeps one step in flight per stage (disjoint micro-batches).
        self.pipeline_depth = config.parallel.pipeline_parallel_size
        self.scheduler = Scheduler(config.scheduler, config.cache, num_gpu_blocks, num_cpu_blocks,
                                   pipeline_depth=self.pipeline_depth)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.spec_config = config.speculative
        self.proposer = None  # spec_decode's NgramProposer or DraftSlots when speculative decoding is on
        self.adaptive = None  # spec_decode.AdaptiveSpeculation unless the config turns it off
        if self.spec_config is not None:
            from vllm_engine.spec_decode.adaptive import AdaptiveSpeculation
            from vllm_engine.spec_decode.draft_model import DraftSlots
            from vllm_engine.spec_decode.ngram import NgramProposer

            spec = self.spec_config
            # A draft model proposes on the workers: the engine only asks for slots (placeholders).
            self.proposer = (NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
                             if spec.is_ngram else DraftSlots())
            self.scheduler.spec_stats = SpecDecodeStats()
            if spec.adaptive:
                self.adaptive = AdaptiveSpeculation(spec.num_speculative_tokens)
        self._structured_output = None  # StructuredOutputManager, made by the first constrained request
        self.num_gpu_blocks, self.num_cpu_blocks = num_gpu_blocks, num_cpu_blocks
        self._ids = itertools.count()
        self.step_profile: Optional[list[dict]] = None
        self._last_log = time.monotonic()
        self._pending = None  # async scheduling: (SchedulerOutput, StepHandle) launched, tokens not yet read
        self._in_flight: deque = deque()  # pipeline: the (SchedulerOutput, handle)s launched, oldest first
        logger.info("engine ready in %.1fs: model %s (%s, %s) on %s, KV cache %d blocks x %d tokens = %d tokens",
                    time.time() - t0, config.model.model, config.model.architecture, config.model.dtype,
                    config.device.device, num_gpu_blocks, config.cache.block_size,
                    num_gpu_blocks * config.cache.block_size)

    # ---- lifecycle -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stops the executor's ranks (worker processes, or the in-process rank, whose device memory
        is released); the engine cannot step afterwards. Idempotent."""
        self.model_runner = None
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown()

    def add_failure_callback(self, fn: Callable[[BaseException], None]) -> None:
        """``fn(error)`` runs (on a monitor thread) if a worker rank dies while no step waits on it."""
        self.executor.add_failure_callback(fn)

    def check_health(self) -> None:
        """Raises if a worker rank is gone (``WorkerDiedError``)."""
        self.executor.check_health()

    # ---- tokenizer helpers -------------------------------------------------------------------------
    def _require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, but this model has none (dummy weights?): pass token ids.")
        return self.tokenizer

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._require_tokenizer("tokenize").encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._require_tokenizer("detokenize").decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, chat_template: Optional[str] = None) -> str:
        """The conversation rendered with the model's chat template (or ``chat_template``) as prompt text."""
        tok = self._require_tokenizer("chat")
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise ValueError("This model has no chat template; pass chat_template= (or --chat-template FILE).")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} objects.")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true.")
        if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
            raise ValueError("continue_final_message needs the last message to be from the assistant.")
        return tok.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config defaults (as vLLM's LLM does)."""
        g = self.generation_config
        kw: dict[str, Any] = {}
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if g.get(key) is not None:
                kw[key] = g[key]
        if g.get("max_new_tokens"):
            kw["max_tokens"] = int(g["max_new_tokens"])
        if g.get("do_sample") is False:
            kw["temperature"] = 0.0
        return SamplingParams(**kw)

    # ---- requests ------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'.")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty.")
            return prompt, self.tokenize(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}.")

    def _check_ids(self, ids: Any) -> list[int]:
        ids = list(ids)
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {t!r}.")
        return ids

    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None, priority: int = 0, stream: bool = True) -> None:
        """Queues a request; ValueError (naming the field) when it can never run, QueueFullError when full.

        ``stream=False``: step() returns this request's output only once, when it finishes.
        """
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use.")
        params = params if params is not None else self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}.")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}.")
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise ValueError("prompt must not be empty (it has 0 tokens).")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{len(ids)} tokens (the prompt plus at least one generated token must fit).")
        params.verify_vocab(self.model_config.vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids).")
        max_tokens = self.max_model_len - len(ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        self._check_admission(params, max_tokens)
        grammar = self._compile_grammar(params)
        arrival_time = arrival_time if arrival_time is not None else time.time()
        eos = set() if params.ignore_eos else self.eos_token_ids
        samples: list[Request] = []
        for i in range(params.n):
            samples.append(Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}", prompt_token_ids=ids,
                sampling_params=params, eos_token_ids=eos, arrival_time=arrival_time, priority=priority,
                parent_id=request_id, sample_index=i, fork_from=samples[0] if i else None, max_tokens=max_tokens))
        for r in samples:
            r.grammar_future = grammar
        added: list[Request] = []
        try:
            for r in samples:
                self.scheduler.add_request(r)
                added.append(r)
            self.output_processor.add_request(request_id, text, ids, params, samples, arrival_time, stream)
        except Exception:  # nothing of a request that was not accepted stays behind
            self.scheduler.finish_requests([r.request_id for r in added], RequestStatus.FINISHED_ABORTED)
            self.output_processor.remove(request_id)
            raise

    def structured_output_manager(self) -> Any:
        """The StructuredOutputManager (grammar compiles, cached by text), shared with an in-process runner."""
        if self._structured_output is None:
            from vllm_engine.structured_output import StructuredOutputManager

            tok = self._require_tokenizer("structured_outputs")
            self._structured_output = StructuredOutputManager(tok, self.model_config.vocab_size, self.eos_token_ids)
            if self.model_runner is not None:
                self.model_runner.grammars.manager = self._structured_output
        return self._structured_output

    def _compile_grammar(self, params: SamplingParams) -> Any:
        """Starts compiling the request's constraint in the background (None without one): the scheduler
        holds the request back until it is done; a constraint that does not compile ends the request
        with an error when it runs (the server compiles first and answers 400 instead)."""
        if params.structured_outputs is None:
            return None
        return self.structured_output_manager().submit(params.structured_outputs)

    def _wait_for_grammars(self) -> None:
        """When every request is waiting for its grammar to compile, waits (up to 10 ms) for one compile
        rather than spinning the loop (the compile thread needs the CPU)."""
        sched = self.scheduler
        if (sched.num_running or sched.num_swapped or not sched.num_waiting or self._pending is not None
                or self._in_flight):
            return
        futures = [r.grammar_future for r in sched.waiting]
        if all(f is not None and not f.done() for f in futures):
            concurrent.futures.wait(futures, timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)

    def _check_admission(self, params: SamplingParams, max_tokens: int) -> None:
        """The limits that depend on the engine: n, min_tokens within the context, the waiting queue
        (counted in sequences: a request with n samples queues n)."""
        sched = self.config.scheduler
        if params.n > sched.max_n:
            raise SamplingParamsError("n", f"must be at most {sched.max_n} (the server's max_n), got {params.n}.")
        if params.min_tokens > max_tokens:
            raise SamplingParamsError(
                "min_tokens", f"must be at most {max_tokens} (what fits in the context after the prompt), got "
                              f"{params.min_tokens}.")
        limit = sched.max_waiting_requests
        if limit is None:
            return
        if params.n > limit:
            raise SamplingParamsError("n", f"must be at most {limit} (the server's max_waiting_requests), got "
                                           f"{params.n}.")
        if self.scheduler.num_waiting + params.n > limit:
            raise QueueFullError(f"{self.scheduler.num_waiting} sequences are waiting and this request adds "
                                 f"{params.n} (max_waiting_requests={limit}).")

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        """Stops requests (by the id given to add_request) and frees their KV blocks at once."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        sample_ids = [sid for rid in ids for sid in self.output_processor.sample_request_ids(rid)]
        self.scheduler.finish_requests(sample_ids, RequestStatus.FINISHED_ABORTED)
        for rid in ids:
            self.output_processor.remove(rid)

    def has_unfinished_requests(self) -> bool:
        return self._pending is not None or bool(self._in_flight) or self.scheduler.has_unfinished_requests()

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns outputs of the requests that made progress (cumulative)."""
        if self._structured_output is not None:
            self._wait_for_grammars()
        if self.pipeline_depth > 1:
            return self._step_pipelined()
        if self.config.device.async_scheduling:
            return self._step_overlapped()
        prof = self.step_profile is not None
        timed = prof or self.adaptive is not None
        t0 = time.perf_counter() if timed else 0.0
        if self.proposer is not None:
            plan = self._plan()
            if plan:
                self._propose(plan)
        sched_out = self.scheduler.schedule()
        self._log_step(sched_out)
        t1 = time.perf_counter() if prof else 0.0
        handle = self.executor.launch(sched_out.execute_model_request)
        runner_out = self.executor.collect(handle)
        t2 = time.perf_counter() if prof else 0.0
        updated = self.scheduler.update_from_output(sched_out, runner_out)
        self._observe_verified(sched_out, runner_out)
        outputs = self._process(updated, runner_out)
        if timed:
            t3 = time.perf_counter()
            if prof:
                self._record(sched_out, t0, t1, t2, t3, handle.wait_s)
            self._observe_step(sched_out, t3 - t0)
        return outputs

    def _process(self, updated: list[Request], runner_out) -> list[RequestOutput]:
        outputs, stopped, failed = self.output_processor.process(updated, runner_out)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        if failed:  # frees their blocks; the runner drops their state with the next step's finished ids
            self.scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR)
        return outputs

    def _step_overlapped(self) -> list[RequestOutput]:
        """Async scheduling: schedule and launch step N+1 *before* waiting for step N's tokens.

        The scheduler counts N's sampled tokens as placeholders (``Scheduler.advance``); the runner feeds
        their real values to N+1 straight from the device. While the GPU runs N+1, the host waits for N,
        fills in its tokens, checks stops and builds outputs. A request that N finished (EOS) may have
        been scheduled in N+1: that extra token is dropped. Penalties need the previous token's value
        on the host, so a step with such requests first waits for the one in flight.
        """
        prof = self.step_profile is not None
        timed = prof or self.adaptive is not None
        t0 = time.perf_counter() if timed else 0.0
        pending, self._pending = self._pending, None
        outputs: list[RequestOutput] = []
        waited = 0.0  # seconds the host spent waiting for the GPU in this step
        plan = self._plan() if self.proposer is not None else None
        if pending is not None and (plan or pending[0].spec_token_ids or any(
                _needs_host_tokens(r.sampling_params) for _, r in pending[0].sampled_requests)):
            outputs += self._resolve(pending)
            waited += pending[1].wait_s
            pending = None
        if plan:
            self._propose(plan)
        sched_out = self.scheduler.schedule()
        self._log_step(sched_out)
        t1 = time.perf_counter() if prof else 0.0
        handle = self.executor.launch(sched_out.execute_model_request)
        t2 = time.perf_counter() if prof else 0.0
        if pending is not None:
            outputs += self._resolve(pending)
            waited += pending[1].wait_s
        self.scheduler.advance(sched_out)
        if sched_out.sampled_requests:
            self._pending = (sched_out, handle)
        else:
            self._resolve((sched_out, handle))  # nothing sampled: only bookkeeping (prompt chunks, logprobs)
            waited += handle.wait_s
        if timed:
            t3 = time.perf_counter()
            if prof:
                self._record(sched_out, t0, t1, t2, t3, waited)
            self._observe_step(sched_out, t3 - t0)
        return outputs

    def _speculating(self) -> bool:
        """Whether this step proposes tokens: speculative decoding is on and the batch is not above
        ``disable_by_batch_size``. A step that proposes waits for the one in flight first (async
        scheduling): the proposals follow the tokens it samples."""
        limit = self.spec_config.disable_by_batch_size
        return limit is None or self.scheduler.num_running <= limit

    def _plan(self) -> Optional[dict[str, int]]:
        """The most tokens each running request may propose this step (None or {}: no proposals):
        k for every request, or what the adaptive policy finds pays
        (spec_decode/adaptive.py). Needs only the requests, not their newest tokens, so with async
        scheduling a step that will not propose keeps overlapping."""
        if not self._speculating():
            return None
        ids = [r.request_id for r in self.scheduler.running if not r.finish_pending]
        if not ids:
            return None
        if self.adaptive is None:
            return dict.fromkeys(ids, self.spec_config.num_speculative_tokens)
        self.adaptive.forget(ids)
        ks = self.adaptive.plan(ids, self.scheduler.num_running)
        return None if ks is None else {rid: k for rid, k in zip(ids, ks) if k}

    def _observe_verified(self, sched_out, runner_out) -> None:
        """Each verified request's acceptance, for the adaptive policy."""
        if self.adaptive is None or not sched_out.spec_token_ids:
            return
        spec, sampled = sched_out.spec_token_ids, runner_out.sampled_token_ids
        for i, req in sched_out.sampled_requests:
            drafts = spec.get(req.request_id)
            if drafts:
                self.adaptive.observe_verified(req.request_id, len(drafts), max(0, len(sampled[i]) - 1))

    def _observe_step(self, sched_out, seconds: float) -> None:
        """A decode step's time, for the adaptive policy's step-time lines (with / without proposals)."""
        if self.adaptive is not None and sched_out.sampled_requests:
            self.adaptive.observe_step(sched_out.total_num_scheduled_tokens, seconds, bool(sched_out.spec_token_ids))

    def _propose(self, plan: dict[str, int]) -> None:
        """Proposals (n-gram lookup) for the planned requests whose next step samples after their
        last token, capped by the plan and so that no proposal runs past max_tokens or
        max_model_len."""
        ids, tokens, caps = [], [], []
        max_len = self.max_model_len
        for r in self.scheduler.running:
            limit = plan.get(r.request_id)
            all_ids = r.all_token_ids
            if not limit or r.num_computed_tokens != len(all_ids) - 1 or all_ids[-1] == PLACEHOLDER_TOKEN_ID:
                continue
            cap = min(limit + 1, r.max_tokens - r.num_output_tokens, max_len - len(all_ids)) - 1
            if cap > 0:
                ids.append(r.request_id)
                tokens.append(all_ids)
                caps.append(cap)
        if ids:
            proposals = self.proposer.propose(ids, tokens, caps)
            self.scheduler.set_proposals({rid: d for rid, d in zip(ids, proposals) if d})

    def _step_pipelined(self) -> list[RequestOutput]:
        """Pipeline parallelism: up to ``pipeline_depth`` steps in flight, so that while the last stage
        runs step N the first runs step N+1.

        The scheduler keeps the steps in flight disjoint (a request whose token is not known yet waits
        for it) and about equal in size. A step() launches a new step while there is room, and
        collects the oldest once the pipeline is full or there is nothing new to launch; a step's
        request states are those of the sync path, so penalties and seeds need nothing special.
        """
        prof = self.step_profile is not None
        t0 = time.perf_counter() if prof else 0.0
        in_flight = self._in_flight
        t1 = t2 = t0
        launched = None
        if len(in_flight) < self.pipeline_depth:
            sched_out = self.scheduler.schedule()
            self._log_step(sched_out)
            t1 = time.perf_counter() if prof else 0.0
            if not in_flight or not _nothing_to_do(sched_out):  # an idle pipeline steps as the sync path does
                handle = self.executor.launch(sched_out.execute_model_request)
                self.scheduler.advance(sched_out)
                in_flight.append((sched_out, handle))
                launched, depth = sched_out, len(in_flight)
            t2 = time.perf_counter() if prof else 0.0
        outputs: list[RequestOutput] = []
        waited = 0.0
        if in_flight and (launched is None or launched.is_empty or len(in_flight) == self.pipeline_depth):
            pending = in_flight.popleft()
            outputs = self._resolve(pending)
            waited = pending[1].wait_s
        if prof and launched is not None:
            self._record(launched, t0, t1, t2, time.perf_counter(), waited, depth)
        return outputs

    def _log_step(self, sched_out) -> None:
        """The step log: preemptions and swaps when they happen, and engine state every 10 s of activity."""
        now = time.monotonic()
        if sched_out.num_preemptions or sched_out.num_swaps:
            logger.info("step: %d requests scheduled (%d tokens); preempted %d, swapped out %d, swapped in %d blocks",
                        len(sched_out.scheduled_requests), sched_out.total_num_scheduled_tokens,
                        sched_out.num_preemptions, sched_out.num_swaps, len(sched_out.blocks_to_swap_in))
        if now - self._last_log >= 10.0 and not sched_out.is_empty:
            self._last_log = now
            st = self.get_stats()
            logger.info("running %d, waiting %d, swapped %d; KV cache %.1f%% used; prefix cache hits %d/%d tokens; "
                        "preemptions %d, swaps %d; tokens: %d prompt, %d generated", st.num_running, st.num_waiting,
                        st.num_swapped, 100 * st.kv_cache_usage, st.prefix_cache_hits, st.prefix_cache_queries,
                        st.num_preemptions_total, st.num_swaps_total, st.num_prompt_tokens_total,
                        st.num_generation_tokens_total)

    def _resolve(self, pending) -> list[RequestOutput]:
        sched_out, handle = pending
        runner_out = self.executor.collect(handle)
        updated = self.scheduler.resolve(sched_out, runner_out)
        self._observe_verified(sched_out, runner_out)
        return self._process(updated, runner_out)

    def _record(self, sched_out, t0: float, t1: float, t2: float, t3: float, waited: float = 0.0,
                in_flight: int = 0) -> None:
        """One step's phases. ``wait_ms`` (inside update_and_output with async scheduling) is the host
        waiting for the GPU; ``host_ms`` = total - wait is the host's own work for the step;
        ``in_flight``: steps in flight once it was launched, itself included (pipeline parallelism)."""
        self.step_profile.append({
            "in_flight": in_flight,
            "num_seqs": len(sched_out.scheduled_requests), "num_tokens": sched_out.total_num_scheduled_tokens,
            "num_draft_tokens": sum(map(len, sched_out.spec_token_ids.values())) if sched_out.spec_token_ids else 0,
            "schedule_ms": (t1 - t0) * 1e3, "execute_ms": (t2 - t1) * 1e3,
            "prepare_inputs_ms": self._last_prepare_ms(), "update_and_output_ms": (t3 - t2) * 1e3,
            "wait_ms": waited * 1e3, "host_ms": (t3 - t0 - waited) * 1e3, "total_ms": (t3 - t0) * 1e3})

    def _last_prepare_ms(self) -> float:
        """The in-process runner's input preparation of its last step (NaN when the ranks run in
        other processes: their time is theirs)."""
        runner = self.model_runner
        return runner.last_prepare_s * 1e3 if runner is not None else float("nan")

    def enable_step_profile(self) -> list[dict]:
        """Start recording per-step phase times; returns the (growing) list of records."""
        self.step_profile = []
        return self.step_profile

    def snapshot(self) -> dict:
        """Read-only view of the queues, each request's progress and the KV block map (``Scheduler.snapshot``,
        plus the engine's token totals); call it between steps (the AsyncEngine's loop thread does)."""
        return {**self.scheduler.snapshot(), "model": self.served_model_name,
                "num_prompt_tokens_total": self.output_processor.num_prompt_tokens_total,
                "num_generation_tokens_total": self.output_processor.num_generation_tokens_total}

    def get_stats(self) -> EngineStats:
        s = self.scheduler.get_stats()
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_swapped=s.num_swapped,
            kv_cache_usage=s.kv_cache_usage, num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_total_blocks,
            prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions_total=s.num_preemptions_total, num_swaps_total=s.num_swaps_total,
            num_prompt_tokens_total=self.output_processor.num_prompt_tokens_total,
            num_generation_tokens_total=self.output_processor.num_generation_tokens_total,
            spec_decode=s.spec,
        )

    # ---- offline API ---------------------------------------------------------------------------------
    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True, priority: Optional[Sequence[int]] = None
                 ) -> Union[RequestOutput, list[RequestOutput]]:
        """Runs prompts to completion; outputs in input order. A single prompt returns one RequestOutput."""
        single = isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and len(prompts) > 0 and all(isinstance(t, int) for t in prompts))
        batch = [prompts] if single else list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params_list = [sampling_params or self.default_sampling_params()] * len(batch)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(batch):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(batch)} prompts.")
        if priority is not None and len(priority) != len(batch):
            raise ValueError(f"got {len(priority)} priorities for {len(batch)} prompts.")
        outs = self._run_batch(batch, params_list, use_tqdm, priority)
        return outs[0] if single else outs

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None, use_tqdm: bool = True,
             chat_template: Optional[str] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> Union[RequestOutput, list[RequestOutput]]:
        """Applies the chat template to one conversation (or a list of them) and generates."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else list(messages)
        prompts = []
        for conv in convs:
            text = self.apply_chat_template(conv, add_generation_prompt, continue_final_message, chat_template)
            # The template already holds the special tokens (BOS): do not add them twice.
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenize(text, add_special_tokens=False)})
        outs = self.generate(prompts, sampling_params, use_tqdm)
        return outs if not single else outs[0]

    def _run_batch(self, batch: list[PromptType], params_list: list[SamplingParams], use_tqdm: bool,
                   priority: Optional[Sequence[int]]) -> list[RequestOutput]:
        ids = [f"gen-{next(self._ids)}" for _ in batch]
        try:
            for i, (prompt, params) in enumerate(zip(batch, params_list)):
                self.add_request(ids[i], prompt, params, priority=priority[i] if priority else 0, stream=False)
        except Exception:
            self.abort_request(ids)
            raise
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batch), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            while len(final) < len(batch):
                for out in self.step():
                    if out.finished and out.request_id not in final:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if len(final) < len(batch) and not self.has_unfinished_requests():
                    missing = [i for i in ids if i not in final]
                    raise RuntimeError(f"requests {missing[:5]} were lost by the scheduler")
        except BaseException:
            self.abort_request([i for i in ids if i not in final])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[i] for i in ids]
