"""ModelRunner: owns the device state (weights, KV cache, per-request generators) and runs one step.

Takes an ``ExecuteModelRequest`` (the scheduler's step as plain data), updates its own request
states from it (``worker/request_states.py``), turns them into flat batch tensors, runs the model,
samples, and returns a ``ModelRunnerOutput`` (token ids and logprobs: plain Python values).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from vllm_engine.attention.backend import AttentionMetadata, get_attn_backend
from vllm_engine.config import EngineConfig
from vllm_engine.core.sched_output import ExecuteModelRequest, ModelRunnerOutput, SampledLogprobs
from vllm_engine.distributed import IntermediateTensors, get_pp_group, get_tp_group
from vllm_engine.engine.request import PLACEHOLDER_TOKEN_ID
from vllm_engine.layers.attention import Attention
from vllm_engine.layers import parallel_compile
from vllm_engine.layers.parallel_compile import compile_ahead
from vllm_engine.layers.sampler import Sampler, SamplingMetadata, compute_logprobs_topk
from vllm_engine.quantization import linear_picker
from vllm_engine.utils import StartupPhases
from vllm_engine.spec_decode.verify import VerifiedStep, verify, verify_rows
from vllm_engine.spec_decode.verify import input_token_ids as verify_input_token_ids
from vllm_engine.structured_output.worker import WorkerGrammars
from vllm_engine.worker.block_tables import GroupedHostBlockTables, HostBlockTables
from vllm_engine.worker.kv_cache import DeviceMemory, KVCache, KVCacheSpec, determine_num_blocks, kv_budget
from vllm_engine.worker.request_states import (
    CachedRequestState, RequestStates, append_placeholders, fill_placeholders)
from vllm_engine.worker.staging import HostStaging
from vllm_engine.worker.startup_cache import fingerprint, load_linear_choices, save_linear_choices, use_triton_cache

logger = logging.getLogger(__name__)


@dataclass
class _PromptLogprobRows:
    """Rows of this step whose logits give logprobs of the next prompt token."""

    req_index: int
    first_row: int  # flat row of the first such token
    num_rows: int
    next_token_ids: list[int]


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    sample_rows: list[int]  # flat row whose logits are sampled, one per sampled request
    sample_rows_dev: torch.Tensor  # the same rows, int64 on the device
    sample_req_indices: list[int]  # index into the step's req_ids of each sampled row
    prompt_logprob_rows: list[_PromptLogprobRows]
    # A step verifying proposals: per sampled request its number of proposed tokens (its rows in
    # sample_rows are that many + 1); None in every other step.
    num_draft_tokens: Optional[list[int]] = None


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        from vllm_engine.model_loader import get_model

        self.config = config
        self.model_config = config.model
        self.device = config.device.device
        self.dtype = config.model.dtype
        self.block_size = config.cache.block_size
        # Start-up phases of this rank (seconds), logged one line each (issue 24's breakdown).
        self.startup = StartupPhases(logger, self.device)
        torch.manual_seed(config.model.seed)
        self.attn_backend = get_attn_backend(self.device, config.device.attention_backend,
                                             multi_query_len=self._verify_query_len())
        # What the device holds before this engine: others' (kv_cache.kv_budget).
        self._memory_at_start = DeviceMemory.now() if self.device.type == "cuda" else None
        self._compiles_at_start = dataclasses.replace(parallel_compile.totals)  # this start's: the difference
        if self.device.type == "cuda":  # before this process's first Triton compile
            use_triton_cache(config.device.startup_cache)
        startup_fp, startup_choices = self._read_startup_cache()
        if self.device.type == "cuda" and not startup_choices:  # a first start (startup_cache.is_first_start)
            # or the cache is off: workers for initialize_cache's compile passes (an engine with its
            # one rank here started them before its config already)
            ranks = config.parallel.tensor_parallel_size * config.parallel.pipeline_parallel_size
            parallel_compile.start_workers(max(1, min(parallel_compile.MAX_WORKERS,
                                                      parallel_compile.usable_cpus() // ranks)))
        with self.startup("model and weights"):
            self.model = get_model(config.model, self.device, self.attn_backend)
        self.drafter = None  # spec_decode's DraftModelRunner / EagleProposer when a model proposes
        if config.speculative is not None and not config.speculative.is_ngram:
            from vllm_engine.spec_decode.draft_model import make_drafter

            with self.startup("draft model and weights"):
                self.drafter = make_drafter(config, self.device, self.attn_backend, self.model)
        self._startup_fingerprint = self._offer_startup_choices(startup_fp, startup_choices)
        # This process's place in the parallel layout, as the model was built for it.
        self.tp_group, self.pp_group = get_tp_group(), get_pp_group()
        self.vocab_size = config.model.vocab_size
        self.sampler = Sampler()
        self.staging = HostStaging(self.device, slots=8)  # a step's inputs, sampling arrays: a copy each
        # KV cache groups (core/kv_cache_groups.py): each attention layer's group and tensor; one group: None.
        self.num_kv_groups = max(1, len(config.cache.kv_cache_groups))
        self.layer_slots = self._bind_kv_cache_groups() if self.num_kv_groups > 1 else None
        max_blocks = -(-config.model.max_model_len // self.block_size)
        self.requests = RequestStates(
            HostBlockTables(max_blocks, rows=config.scheduler.max_num_seqs) if self.num_kv_groups == 1
            else GroupedHostBlockTables(self.num_kv_groups, max_blocks, rows=config.scheduler.max_num_seqs))
        self.kv_cache: Optional[KVCache] = None
        self.graph_runner = None  # CUDAGraphRunner for decode and verify steps (CUDA, unless enforce_eager)
        self.generators: dict[str, torch.Generator] = {}
        # Structured outputs; the engine hands over its StructuredOutputManager when in the same process.
        self.grammars = WorkerGrammars(config.model)
        self._last_handle: Optional[StepHandle] = None  # the latest launch that sampled
        self._last_sampled: Optional[torch.Tensor] = None  # the previous launch's sampled ids (device)
        self._last_sample_row: dict[str, int] = {}
        self.last_prepare_s = 0.0  # CPU time of the last step's input preparation
        self.num_tokens_processed = 0  # total tokens run through the model (tests check prefix-cache savings)
        # When a list (CUDA only): one (num_seqs, num_tokens, start, forward, end) per launched step, the
        # last three CUDA events (step start, after input preparation, step end),
        # so a benchmark can split the GPU's time into busy and idle (tests/benchmarks/gpu_timeline.py).
        self.gpu_timeline: Optional[list] = None

    # ---- KV cache ------------------------------------------------------------------------------
    def initialize_kv_cache(self) -> tuple[int, int]:
        """Sizes and allocates the KV cache (one rank: no agreement needed); returns
        (num_gpu_blocks, num_cpu_blocks)."""
        num_blocks = self.determine_num_blocks()
        self.initialize_cache(*num_blocks)
        return num_blocks

    def kv_cache_spec(self) -> KVCacheSpec:
        """This rank's share of the KV cache, read from the model as built: the attention layers of
        its pipeline stage, with its tensor-parallel share of the KV heads."""
        attn = [m for m in self.model.modules() if isinstance(m, Attention)]
        if not attn:
            raise ValueError(f"{type(self.model).__name__} has no attention layer on this rank")
        layouts = {a.cache_layout for a in attn}
        if len(layouts) > 1:
            raise ValueError(f"{type(self.model).__name__} mixes KV cache layouts {sorted(layouts)}")
        layout = layouts.pop()
        dtype = self.config.cache.cache_dtype or self.dtype
        if dtype != self.dtype and layout != "kv":
            raise ValueError(f"kv_cache_dtype: {dtype} is not supported with the {layout} cache layout "
                             f"({type(self.model).__name__}); use kv_cache_dtype='auto'")
        if self.layer_slots is None:
            return KVCacheSpec(len(attn), attn[0].num_kv_heads, attn[0].head_dim, self.block_size, dtype, layout)
        num_tensors = max(self.layer_slots) + 1
        return KVCacheSpec(num_tensors, attn[0].num_kv_heads, attn[0].head_dim, self.block_size, dtype, layout,
                           layer_slots=self.layer_slots, num_groups=self.num_kv_groups)

    def _bind_kv_cache_groups(self) -> tuple[int, ...]:
        """Several KV cache groups: tells each attention layer of this stage its group (the metadata it
        reads) and returns each one's KV tensor, numbered from 0 over the group positions this stage
        uses. ValueError when a layer's window is not its group's."""
        from vllm_engine.core.kv_cache_groups import layer_group_slots
        from vllm_engine.models.utils import DecoderStack

        attn = [m for m in self.model.modules() if isinstance(m, Attention)]
        start = next((m.start_layer for m in self.model.modules() if isinstance(m, DecoderStack)), 0)
        groups = self.config.cache.kv_cache_groups
        slots = layer_group_slots(groups, self.model_config.num_layers)[start: start + len(attn)]
        for layer, (g, _) in zip(attn, slots):
            if layer.sliding_window != groups[g].sliding_window:
                raise ValueError(f"an attention layer's window {layer.sliding_window} differs from its KV cache "
                                 f"group's {groups[g].sliding_window}")
            layer.kv_cache_group = g
        used = sorted({j for _, j in slots})
        return tuple(used.index(j) for _, j in slots)

    def determine_num_blocks(self) -> tuple[int, int]:
        """(num_gpu_blocks, num_cpu_blocks) that fit on this rank (on CUDA: after a profiling forward).
        With several ranks the executor passes the minimum over ranks to ``initialize_cache``."""
        draft_bytes = self.drafter.kv_cache_spec().bytes_per_block if self.drafter is not None else 0
        with self.startup("memory profile"):
            return determine_num_blocks(self.config, self.kv_cache_spec(), self._profile_free_memory, draft_bytes)

    def initialize_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        """Allocates the KV cache, then what depends on it: CUDA graphs and kernel warm-ups (the
        last of start-up: the compile workers end here)."""
        try:
            self._initialize_cache(num_gpu_blocks, num_cpu_blocks)
        finally:
            parallel_compile.stop_workers()

    def _initialize_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        with self.startup("KV cache allocation"):
            self.kv_cache = KVCache.allocate(self.config, self.kv_cache_spec(), num_gpu_blocks, num_cpu_blocks,
                                             self.device)
        if self.drafter is not None:
            with self.startup("draft KV cache and graphs"):
                self.drafter.allocate(num_gpu_blocks, num_cpu_blocks)
        if self.device.type == "cuda" and not self.config.device.enforce_eager:
            from vllm_engine.worker.cuda_graphs import CUDAGraphRunner

            with self.startup("CUDA graph capture"):
                self.graph_runner = CUDAGraphRunner(
                    self.model, self.kv_cache.gpu_caches, self.config.scheduler.max_num_seqs,
                    self.model_config.max_model_len, self.block_size, self.model_config.hf_config.hidden_size,
                    self.dtype, self.device, stage_input=not self.pp_group.is_first_rank,
                    num_kv_groups=self.num_kv_groups, verify_query_len=self._verify_query_len(),
                    max_num_batched_tokens=self.config.scheduler.max_num_batched_tokens,
                    token_row_buffers=self._token_row_buffers())
                self.graph_runner.capture()
        if self.device.type == "cuda" and hasattr(self.attn_backend, "warmup") and self.kv_cache.block_dim == 1:
            with self.startup("attention warm-up"):
                num_heads = self.model_config.num_heads // self.tp_group.world_size  # this rank's query heads
                n = self.attn_backend.warmup(self.kv_cache.gpu_caches[0], num_heads, self.model_config.max_model_len,
                                             query_dtype=self.dtype)
            logger.info("attention kernels warmed up for eager steps (%d variants)", n)
        picker = linear_picker(self.model)
        if picker is not None and self.pp_group.is_last_rank:  # layers.triton_linear.LinearPicker
            with self.startup("LM head warm-up"):
                self._warm_lm_head()
            logger.info("%s", picker.summary())
        if picker is not None and self._startup_fingerprint is not None:
            save_linear_choices(self._startup_fingerprint, picker.choices())
        self._record_kernel_work(picker)

    def _record_kernel_work(self, picker: Any) -> None:
        """Start-up entries for two costs spread over the phases above ("within: ..."): timing the
        linear kernels' candidates, and this start's Triton compiles ahead (side by side)."""
        if picker is not None:
            self.startup.record("within: linear-kernel timing", picker.timing_seconds,
                                f"{sum(1 for _, times in picker.decisions.values() if times)} shapes timed")
        variants = parallel_compile.totals.variants - self._compiles_at_start.variants
        if variants:
            self.startup.record("within: Triton compiles ahead",
                                parallel_compile.totals.seconds - self._compiles_at_start.seconds,
                                f"{variants} variants")

    def _verify_query_len(self) -> int:
        """Query tokens per sequence of a verifying step (k proposals + 1): its CUDA graphs' q; 0
        without speculative decoding."""
        spec = self.config.speculative
        return spec.verify_query_len if spec is not None else 0

    def _token_row_buffers(self) -> list[torch.Tensor]:
        """Buffers the model fills one row per input token (EAGLE-3's auxiliary hidden states)."""
        from vllm_engine.models.utils import DecoderStack

        return [m.aux_hidden for m in self.model.modules() if isinstance(m, DecoderStack) and m.aux_hidden is not None]

    def _read_startup_cache(self) -> tuple[Optional[dict], dict[str, str]]:
        """This GPU and software's start-up fingerprint, and the linear-kernel choices earlier starts
        recorded under it (worker/startup_cache.py); (None, {}) off a GPU or with the cache off."""
        if self.device.type != "cuda" or not self.config.device.startup_cache:
            return None, {}
        fp = fingerprint(self.device)
        return fp, load_linear_choices(fp)

    def _offer_startup_choices(self, fp: Optional[dict], choices: dict[str, str]) -> Optional[dict]:
        """Offers the picker the choices of earlier starts; returns the fingerprint to save this
        start's under (None: no picker, or the cache is off)."""
        picker = linear_picker(self.model)
        if picker is None or fp is None:
            return None
        picker.prefer(choices)
        logger.info("start-up cache: %d linear-kernel choices of earlier starts", len(choices))
        return fp

    @torch.inference_mode()
    def _warm_lm_head(self) -> None:
        """Runs the LM head at every row count a step can sample, rounded to the picker's buckets.

        The LM head runs outside the CUDA graphs, on the rows being sampled (1 to max_num_seqs), so
        without this the picker would time its candidates, and Triton compile the winners, in the
        middle of the first requests (seconds of stall). Rows b and b - 1 per power of 2 b: Triton
        compiles separate variants for a row count of 1, and for multiples of 16 and the rest.
        """
        max_rows = self.config.scheduler.max_num_seqs
        rows, b = set(), 1
        while b < 2 * max_rows:
            rows.update(r for r in (min(b, max_rows), min(b, max_rows) - 1) if r >= 1)
            b *= 2
        hidden_size = self.model_config.hf_config.hidden_size
        hidden = [torch.zeros(n, hidden_size, dtype=self.dtype, device=self.device) for n in sorted(rows)]
        with compile_ahead():  # every variant compiles side by side first; the picker times below
            for h in hidden:
                self.model.compute_logits(h)
        for h in hidden:
            self.model.compute_logits(h)

    def _profile_free_memory(self) -> int:
        """Bytes left for KV blocks on the GPU after a warm-up forward at the largest batch."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = self.config.scheduler.max_num_batched_tokens
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        meta, num_blocks = _dummy_prefill_metadata(n, self.model_config.max_model_len, self.block_size, self.device)
        pos = torch.cat([torch.arange(l, device=self.device) for l in meta.seq_lens_cpu])
        # One layer's worth of cache, shared by every layer: enough to run the warm-up, small next to the budget.
        spec = self.kv_cache_spec()
        cache = torch.zeros(spec.layer_shape(num_blocks), dtype=spec.dtype, device=self.device)
        reserve = self.drafter.profile_reserve() if self.drafter is not None else None  # draft distributions
        caches = [cache] * (len(spec.layer_slots) if spec.layer_slots else spec.num_layers)
        if self.num_kv_groups > 1:  # every group's layers on the same blocks: enough for a profile
            g = self.num_kv_groups
            meta = meta.with_groups(meta.block_tables.expand(g, *meta.block_tables.shape),
                                    meta.slot_mapping.expand(g, *meta.slot_mapping.shape))
        pp = self.pp_group
        with torch.inference_mode():
            # A later pipeline stage starts from hidden states (zeros here: no other stage takes part).
            hidden_size = self.model_config.hf_config.hidden_size
            stage_input = None if pp.is_first_rank else IntermediateTensors(
                torch.zeros(n, hidden_size, dtype=self.dtype, device=self.device),
                torch.zeros(n, hidden_size, dtype=self.dtype, device=self.device))

            def forward() -> torch.Tensor:
                hidden = self.model(ids, pos, caches, meta, stage_input)
                if pp.is_last_rank:
                    self.model.compute_logits(hidden[: self.config.scheduler.max_num_seqs])
                return hidden

            with compile_ahead() as ahead:  # its Triton variants compile side by side first
                if ahead:
                    forward()
            torch.cuda.reset_peak_memory_stats()  # from what is held now (the inputs and the cache)
            hidden = forward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - cache.numel() * cache.element_size()
        del hidden, caches, cache, reserve
        torch.cuda.empty_cache()
        return kv_budget(self._memory_at_start, DeviceMemory.now(), peak, self.config.cache.gpu_memory_utilization)

    # ---- one step ------------------------------------------------------------------------------
    def execute_model(self, msg: ExecuteModelRequest) -> ModelRunnerOutput:
        """Runs one step and waits for its sampled tokens."""
        return self.collect(self.launch(msg))

    @torch.inference_mode()
    def launch(self, msg: ExecuteModelRequest) -> "StepHandle":
        """Queues one step on the device (forward and sampling) without waiting for it.

        Input tokens that are still placeholders (sampled by the previous launch, not yet known on the
        host) are taken from that launch's sampled-token tensor on the device.
        """
        assert self.kv_cache is not None, "initialize_kv_cache() first"
        for req_id in msg.finished_req_ids:
            self.generators.pop(req_id, None)
        if self.drafter is not None:
            self.drafter.finish(msg.finished_req_ids)
        if self.grammars:
            self.grammars.finish(msg.finished_req_ids)
        reqs = self.requests.update(msg)
        self.kv_cache.swap_out(msg.blocks_to_swap_out)
        self.kv_cache.swap_in(msg.blocks_to_swap_in)
        self.kv_cache.copy_blocks(msg.blocks_to_copy)
        if self.drafter is not None:
            self.drafter.move_blocks(msg)
        out = ModelRunnerOutput(req_ids=msg.req_ids)
        if msg.new_requests and self.pp_group.is_last_rank:
            self.grammars.add(msg.new_requests, out.failed)
        handle = StepHandle(out)
        if msg.is_empty:
            return handle
        timed = self.gpu_timeline is not None and self.device.type == "cuda"
        if timed:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        spec, draft_probs = msg.spec_token_ids, None
        if spec and self.drafter is not None:  # the draft model fills in the proposals' placeholders
            spec, draft_probs = self.drafter.propose(reqs, spec, self.requests.host_tables,
                                                     lambda states: self._seeded_generators(states, handle))
        t0 = time.perf_counter()
        inputs = self._prepare_inputs(msg, reqs, spec)
        self.last_prepare_s = time.perf_counter() - t0
        if timed:  # the GPU reaches this after the input copies; before it, it may wait for the host
            forward = torch.cuda.Event(enable_timing=True)
            forward.record()
        self.num_tokens_processed += msg.total_num_scheduled_tokens
        hidden = self._forward(inputs)
        out.sampled_token_ids = [[] for _ in reqs]
        out.logprobs = [[] for _ in reqs]
        # Only the last pipeline stage samples; the others get the tokens in a later step's message.
        last_stage = self.pp_group.is_last_rank
        if inputs.sample_rows and last_stage:
            if inputs.num_draft_tokens is not None:
                self._verify(reqs, inputs, hidden, handle, spec, draft_probs)
            else:
                self._sample(reqs, inputs, hidden, handle)
        if self.drafter is not None:  # the draft's K/V for the step's tokens (after sampling: it need not wait)
            self.drafter.forward_step(inputs, hidden, reqs, handle.verified)
        if inputs.prompt_logprob_rows and last_stage:
            self._prompt_logprobs(reqs, inputs, hidden, out)
        if timed:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.gpu_timeline.append((meta.num_seqs, meta.num_actual_tokens, start, forward, end))
        return handle

    @staticmethod
    def collect(handle: "StepHandle") -> ModelRunnerOutput:
        """Waits for a launched step: its sampled token ids, as host ints (the one sync per step),
        also written over the placeholders the launch appended to its requests' states."""
        out = handle.output
        if handle.verified is not None:
            handle.verified.write(out)
            handle.wait_s = handle.verified.wait_s
        elif handle.sampled is not None:
            tokens = handle.host_tokens()
            sampled = out.sampled_token_ids
            for req_index, token in zip(handle.sample_req_indices, tokens):
                sampled[req_index] = [token]
        return out

    def _sample(self, states: list[CachedRequestState], inputs: StepInputs, hidden: torch.Tensor,
                handle: "StepHandle") -> None:
        logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_rows_dev))
        reqs = [states[i] for i in inputs.sample_req_indices]
        generators = self._seeded_generators(reqs, handle)
        meta = SamplingMetadata.from_requests(
            params=[r.sampling_params for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            eos_token_ids=[r.eos_token_ids for r in reqs],
            generators=generators,
            vocab_size=logits.shape[-1],
            device=self.device,
            staging=self.staging,
        )
        if self.grammars:  # after the forward is queued: the GPU runs it while the host fills the masks
            self.grammars.fill(reqs, meta, self.staging, self._read_last_tokens, handle.output.failed)
        result = self.sampler(logits, meta)
        self._keep_sampled(reqs, inputs, result.sampled_token_ids, handle)
        out = handle.output
        if result.logprobs is not None:
            for row, req_index in enumerate(inputs.sample_req_indices):
                if reqs[row].sampling_params.logprobs is not None:
                    out.logprobs[req_index] = [_trim(result.logprobs[row], reqs[row].sampling_params.logprobs)]

    def _verify(self, states: list[CachedRequestState], inputs: StepInputs, hidden: torch.Tensor,
                handle: "StepHandle", spec: dict[str, list[int]], draft_probs: Optional[torch.Tensor]) -> None:
        """A step with proposals: every sampled request's rows through the rejection sampler
        (spec_decode/verify.py); its tokens reach the request states at ``collect``. ``draft_probs``:
        [D, V] the draft model's proposal distributions (None: deterministic proposals)."""
        logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_rows_dev))
        reqs = [states[i] for i in inputs.sample_req_indices]
        generators = self._seeded_generators(reqs, handle)
        grammar = None
        if self.grammars:  # structured-output requests in the step: their rows masked as in _sample
            grammar = self.grammars.fill_verify(reqs, inputs.num_draft_tokens, spec, self.staging,
                                                self._read_last_tokens, handle.output.failed)
        handle.verified = verify(logits, reqs, inputs.sample_req_indices, inputs.num_draft_tokens, spec,
                                 generators, self.device, self.staging, grammar, draft_probs)

    def _read_last_tokens(self) -> None:
        """The latest launch's sampled ids to the host now, ahead of its collect (structured outputs)."""
        if self._last_handle is not None:
            self._last_handle.host_tokens()

    def _keep_sampled(self, reqs: list[CachedRequestState], inputs: StepInputs, sampled: torch.Tensor,
                      handle: "StepHandle") -> None:
        """The step's sampled ids (``sampled``: [num sampled] int64 on the device, in the order of
        ``reqs``) become the handle's result and the next launch's placeholder source."""
        handle.sampled = sampled
        handle.sample_req_indices = inputs.sample_req_indices
        if self.device.type == "cuda":
            # Queue the copy to the host now: a later .tolist() would also wait for the next step,
            # which async scheduling has queued behind this one by then.
            handle.sampled_host = torch.empty(handle.sampled.shape, dtype=handle.sampled.dtype, pin_memory=True)
            handle.sampled_host.copy_(handle.sampled, non_blocking=True)
            handle.copied = torch.cuda.Event()
            handle.copied.record()
        # The sampled tokens join their requests as placeholders, filled in by collect(); the next
        # launch reads any it needs before then from here.
        handle.placeholder_states, handle.placeholder_index = reqs, append_placeholders(reqs)
        self._last_handle = handle
        self._last_sampled = sampled
        self._last_sample_row = {r.req_id: row for row, r in enumerate(reqs)}

    # ---- pipeline parallelism ------------------------------------------------------------------
    def _forward(self, inputs: StepInputs) -> Optional[torch.Tensor]:
        """This pipeline stage's share of the forward pass (a CUDA graph replay for a decode-only step
        that fits a captured batch size): the hidden states after the final norm on the last stage,
        None on the others. A stage after the first starts from the previous stage's (hidden states,
        residual), [num tokens, hidden] each; a stage before the last sends its own on."""
        meta, pp = inputs.attn_metadata, self.pp_group
        stage_input = None
        if not pp.is_first_rank:
            shape = (inputs.positions.shape[0], self.model_config.hf_config.hidden_size)
            stage_input = IntermediateTensors(pp.recv(shape, self.dtype, self.device),
                                              pp.recv(shape, self.dtype, self.device))
        graphs = self.graph_runner
        if graphs is not None and graphs.fits(meta):
            out = graphs.run(inputs.input_ids, inputs.positions, meta, stage_input)
        else:
            out = self.model(inputs.input_ids, inputs.positions, self.kv_cache.gpu_caches, meta, stage_input)
        if pp.is_last_rank:
            return out
        pp.send(out.hidden_states)
        pp.send(out.residual)
        return None

    def _prompt_logprobs(self, states: list[CachedRequestState], inputs: StepInputs, hidden: torch.Tensor,
                         out: ModelRunnerOutput) -> None:
        for pl in inputs.prompt_logprob_rows:
            req = states[pl.req_index]
            logits = self.model.compute_logits(hidden[pl.first_row: pl.first_row + pl.num_rows])
            ids = torch.tensor(pl.next_token_ids, device=self.device)
            entries = compute_logprobs_topk(logits, ids, req.sampling_params.prompt_logprobs or 0)
            out.prompt_logprobs[req.req_id] = list(entries)

    def _seeded_generators(self, reqs: list[CachedRequestState], handle: "StepHandle") -> dict[int, torch.Generator]:
        """Row -> the generator of each seeded request among ``reqs``; a request whose generator
        cannot be seeded is reported failed in ``handle.output`` (the engine ends it, the batch runs)."""
        generators = {}
        for row, req in enumerate(reqs):
            if req.sampling_params.seed is not None:
                try:
                    generators[row] = self._generator(req)
                except Exception as e:  # noqa: BLE001 - this request's fault
                    logger.exception("request %s: cannot seed its generator", req.req_id)
                    handle.output.failed[req.req_id] = f"{type(e).__name__}: {e}"
        return generators

    def _generator(self, req: CachedRequestState) -> torch.Generator:
        gen = self.generators.get(req.req_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.sampling_params.seed + req.sample_index)
            self.generators[req.req_id] = gen
        return gen

    # ---- flat batch ----------------------------------------------------------------------------
    def _prepare_inputs(self, msg: ExecuteModelRequest, reqs: list[CachedRequestState],
                        spec: Optional[dict[str, list[int]]] = None) -> StepInputs:
        """The step's flat batch; ``reqs``: the scheduled requests' states, in ``msg.req_ids`` order;
        ``spec``: the proposed tokens per request id (None: ``msg.spec_token_ids``; the draft model's)."""
        num_seqs = len(reqs)
        counts = np.asarray(msg.num_scheduled_tokens, dtype=np.int64)
        starts = np.fromiter((r.num_computed_tokens for r in reqs), dtype=np.int64, count=num_seqs)
        seq_lens = starts + counts
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        total = int(query_start_loc[-1])

        # positions: start_i + (0 .. count_i - 1) for each sequence, concatenated
        row_seq = np.repeat(np.arange(num_seqs), counts)
        positions = np.arange(total, dtype=np.int64) - np.repeat(query_start_loc[:-1], counts) + starts[row_seq]
        spec = msg.spec_token_ids if spec is None else spec
        if spec:  # proposed tokens follow their requests' last tokens
            num_drafts = np.fromiter((len(spec.get(r.req_id, ())) for r in reqs), dtype=np.int64, count=num_seqs)
            token_ids = verify_input_token_ids(reqs, spec, starts, query_start_loc, total)
        elif total == num_seqs:  # decode-only: each sequence's one token is at its num_computed_tokens
            token_ids = np.fromiter((r.token_ids[r.num_computed_tokens] for r in reqs), dtype=np.int64,
                                    count=num_seqs)
        else:
            token_ids = np.empty(total, dtype=np.int64)
            for i, r in enumerate(reqs):
                token_ids[query_start_loc[i]: query_start_loc[i + 1]] = r.token_ids[starts[i]: seq_lens[i]]
        placeholders = np.flatnonzero(token_ids == PLACEHOLDER_TOKEN_ID)

        # Block tables: the rows kept across steps (rewritten when the scheduler sends a new table).
        block_tables, _ = self.requests.host_tables.gather(msg.req_ids)
        bs = self.block_size
        # [num_tokens], or [groups, num_tokens] for several KV cache groups ([groups, num_seqs, width] tables)
        slot_mapping = block_tables[..., row_seq, positions // bs].astype(np.int64) * bs + positions % bs

        # A request is sampled when this step reaches its last token (not for a partial prompt chunk).
        num_tokens = np.fromiter((len(r.token_ids) for r in reqs), dtype=np.int64, count=num_seqs)
        if spec:
            num_tokens += num_drafts
        sampled = np.flatnonzero(seq_lens == num_tokens)
        sample_rows = query_start_loc[sampled + 1] - 1
        if spec:  # each sampled request's last row and the rows of its proposals before it
            sample_rows = verify_rows(sample_rows, num_drafts[sampled])
        sample_req_indices = sampled.tolist()
        plp_rows = []
        for i, r in enumerate(reqs):
            if r.sampling_params.prompt_logprobs is not None:
                pl = self._prompt_logprob_rows(r, i, int(starts[i]), int(seq_lens[i]), int(query_start_loc[i]))
                if pl is not None:
                    plp_rows.append(pl)

        # Everything the device needs, in one host-to-device copy (see worker/staging.py).
        # Longest first: the decode kernel starts their programs first (a shorter tail).
        order = np.argsort(-seq_lens, kind="stable").astype(np.int32)
        src = np.fromiter((self._last_sample_row[reqs[i].req_id] for i in row_seq[placeholders]),
                          dtype=np.int64, count=placeholders.size)
        (input_ids, positions_d, qsl_d, seq_lens_d, block_tables_d, slot_mapping_d, order_d, rows_d, ph_d,
         src_d) = self.staging.stage(token_ids, positions, query_start_loc.astype(np.int32),
                                     seq_lens.astype(np.int32), block_tables, slot_mapping, order, sample_rows,
                                     placeholders.astype(np.int64), src)
        if placeholders.size:
            # Tokens sampled by the previous launch and still on the device (async scheduling).
            input_ids.index_copy_(0, ph_d, self._last_sampled.index_select(0, src_d))
        meta = AttentionMetadata(
            num_actual_tokens=total,
            num_seqs=num_seqs,
            query_start_loc=qsl_d,
            seq_lens=seq_lens_d,
            block_tables=block_tables_d,
            slot_mapping=slot_mapping_d,
            max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=query_start_loc.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            decode_order=order_d if num_seqs > 1 else None,
        )
        if self.num_kv_groups > 1:
            meta = meta.with_groups(block_tables_d, slot_mapping_d)
        return StepInputs(
            input_ids=input_ids,
            positions=positions_d,
            attn_metadata=meta,
            sample_rows=sample_rows.tolist(),
            sample_rows_dev=rows_d,
            sample_req_indices=sample_req_indices,
            prompt_logprob_rows=plp_rows,
            num_draft_tokens=num_drafts[sampled].tolist() if spec else None,
        )

    @staticmethod
    def _prompt_logprob_rows(r: CachedRequestState, i: int, start: int, end: int,
                             first_row: int) -> Optional[_PromptLogprobRows]:
        """Rows at positions p in [start, end) with p + 1 < prompt length give logprobs of prompt token p + 1.

        Reported once: a request recomputed after preemption skips the positions it already reported.
        """
        lo = max(start, r.num_prompt_logprobs_done)
        hi = min(end, r.num_prompt_tokens - 1)
        if hi <= lo:
            return None
        r.num_prompt_logprobs_done = hi
        return _PromptLogprobRows(i, first_row + lo - start, hi - lo, r.prompt_token_ids[lo + 1: hi + 1])


@dataclass
class StepHandle:
    """A launched step: its output, filled in by ``ModelRunner.collect``."""

    output: ModelRunnerOutput
    sampled: Optional[torch.Tensor] = None  # [num sampled] int64 on the device
    sample_req_indices: list[int] = field(default_factory=list)
    # The sampled requests' states and where each one's placeholder is in its token_ids, in sampled order
    placeholder_states: list[CachedRequestState] = field(default_factory=list)
    placeholder_index: list[int] = field(default_factory=list)
    sampled_host: Optional[torch.Tensor] = None  # pinned host copy, valid once `copied` has completed
    copied: Optional[torch.cuda.Event] = None
    wait_s: float = 0.0  # how long collect() waited for the GPU (the step profile's idle host time)
    tokens: Optional[list[int]] = None  # the sampled ids on the host, once read
    verified: Optional[VerifiedStep] = None  # a step that verified proposals (instead of `sampled`)

    def host_tokens(self) -> list[int]:
        """The sampled ids as host ints, also written over the placeholders the launch appended to its
        requests' states. Waits for this step's copy the first time (not for steps queued after it)."""
        if self.tokens is None:
            if self.copied is not None:
                t0 = time.perf_counter()
                self.copied.synchronize()
                self.wait_s = time.perf_counter() - t0
                self.tokens = self.sampled_host.tolist()
            else:
                self.tokens = self.sampled.tolist()
            fill_placeholders(self.placeholder_states, self.placeholder_index, self.tokens)
        return self.tokens


def _trim(lp: SampledLogprobs, n: int) -> SampledLogprobs:
    return SampledLogprobs(lp.sampled_logprob, lp.sampled_rank, lp.top_token_ids[:n], lp.top_logprobs[:n])


def _dummy_prefill_metadata(num_tokens: int, max_model_len: int, block_size: int,
                            device: torch.device) -> tuple[AttentionMetadata, int]:
    """Metadata for profiling: the batch as whole prompts of max_model_len (the last one shorter),
    each in its own contiguous run of blocks. Returns (metadata, number of blocks used)."""
    lens = [max_model_len] * (num_tokens // max_model_len)
    if num_tokens % max_model_len:
        lens.append(num_tokens % max_model_len)
    blocks_per_seq = [(l + block_size - 1) // block_size for l in lens]
    width = max(blocks_per_seq)
    block_tables = torch.zeros(len(lens), width, dtype=torch.int32)
    slots, first = [], 0
    for i, (l, nb) in enumerate(zip(lens, blocks_per_seq)):
        block_tables[i, :nb] = torch.arange(first, first + nb, dtype=torch.int32)
        slots.append(torch.arange(l) + first * block_size)
        first += nb
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    meta = AttentionMetadata(
        num_actual_tokens=num_tokens,
        num_seqs=len(lens),
        query_start_loc=torch.from_numpy(qsl).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.cat(slots).to(device),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        query_start_loc_cpu=qsl.tolist(),
        seq_lens_cpu=lens,
    )
    return meta, first
