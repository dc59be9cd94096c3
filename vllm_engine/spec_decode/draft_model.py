"""Speculative decoding with a draft model: a smaller model with the target's tokenizer proposes up
to k tokens per request, one forward per token; the target verifies them in one forward.

KV cache. The draft has its own cache tensors (its layers, its KV heads) with the target's number
of blocks and block size, indexed by the same block ids: a request's one block table, the
scheduler's one allocation, prefix caching, copy-on-write and swapping serve both models
(``determine_num_blocks`` counts both models' bytes per block). The invariant that makes this
sound: every step the draft runs over exactly the tokens the target runs over (``forward``: the
same flat batch, positions and slot mapping), so whatever tokens' K/V a block holds for the
target, it holds for the draft; a block the prefix cache hands out is valid for both, and a
request recomputed after preemption recomputes both.

Proposing (``propose``, at the start of a step that verifies). The engine asks for up to k tokens
per request as placeholders (``DraftSlots``); the scheduler budgets and allocates their slots as for
any proposal. A proposing request has L tokens, L - 1 computed: the draft runs its last token at
position L - 1 and picks d1, then d1 at L, ..., d(k-1) at L + k - 2 and picks dk: k single-token
forwards (decode-only: the draft's CUDA graphs), writing K/V into slots L - 1 .. L + k - 2, all
allocated for this step. The step's joint forward then writes the same values again, and dk's at
L + k - 1. After verification, the slots past the kept tokens hold rejected tokens' K/V in both
caches; the next step overwrites them before they count as computed (as for n-gram proposals).

Draft tokens: the argmax for a greedy request; for a random one, a draw from
q = softmax(draft logits / temperature) (from its own generator when seeded), and q goes to the
rejection sampler, which accepts d with probability min(1, p(d) / q(d)) and draws a rejection's
replacement from max(p - q, 0) normalised: every output token keeps the target's distribution.

Tensor parallelism. Every rank of the target builds its drafter after joining the tensor-parallel
group, so the draft (or head) is sharded as the target is, its cache holds this rank's KV heads, and
its logits are all-gathered: every rank sees the same full logits and the same generators (seeded
per request, or the rank's global one, drawn in the same order everywhere), so every rank proposes
the same drafts and keeps the same tokens without sending them (the target's own rule for sampling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch

from vllm_engine.attention.backend import AttentionMetadata
from vllm_engine.distributed import IntermediateTensors
from vllm_engine.engine.request import PLACEHOLDER_TOKEN_ID
from vllm_engine.layers.attention import Attention
from vllm_engine.layers.sampler import exponential_race
from vllm_engine.worker.kv_cache import KVCache, KVCacheSpec
from vllm_engine.worker.staging import HostStaging

if TYPE_CHECKING:
    from torch import nn

    from vllm_engine.config import EngineConfig
    from vllm_engine.core.sched_output import ExecuteModelRequest
    from vllm_engine.worker.block_tables import HostBlockTables
    from vllm_engine.worker.model_runner import StepInputs
    from vllm_engine.worker.request_states import CachedRequestState


class DraftSlots:
    """The engine's proposer when a draft model proposes: ``cap`` placeholder tokens per request,
    the slots that the worker's draft model fills in at launch (``DraftModelRunner.propose``)."""

    def propose(self, req_ids: Sequence[str], token_ids: Sequence[Sequence[int]],
                max_drafts: Sequence[int]) -> list[list[int]]:
        return [[PLACEHOLDER_TOKEN_ID] * cap for cap in max_drafts]


def make_drafter(config: "EngineConfig", device: torch.device, attn_backend,
                 target: "nn.Module") -> Optional["DraftModelRunner"]:
    """The worker's proposer model for ``config.speculative`` (None for n-gram or no speculation):
    a ``DraftModelRunner``, an ``EagleProposer`` (spec_decode/eagle.py) fed ``target``'s hidden
    states, or an ``Eagle3Proposer`` (spec_decode/eagle3.py) fed three of its layers' states."""
    spec = config.speculative
    if spec is None or spec.method == "ngram":
        return None
    if spec.method == "eagle":
        from vllm_engine.spec_decode.eagle import EagleProposer

        return EagleProposer(config, device, attn_backend, target)
    if spec.method == "eagle3":
        from vllm_engine.spec_decode.eagle3 import Eagle3Proposer

        return Eagle3Proposer(config, device, attn_backend, target)
    return DraftModelRunner(config, device, attn_backend, target)


class DraftModelRunner:
    """The draft model on the worker: its weights, its KV cache (the target's block ids), its
    forwards. Built by the ModelRunner when ``speculative_config`` names a draft model, on every
    tensor-parallel rank (this rank's shard; ``propose`` returns the same drafts on every rank)."""

    takes_hidden = False  # the model's forward takes the target's hidden states (EAGLE)
    position_offset = 0  # the first proposing forward runs at the last token's position + this

    def __init__(self, config: "EngineConfig", device: torch.device, attn_backend, target: "nn.Module") -> None:
        if len(getattr(config.cache, "kv_cache_groups", None) or ()) > 1:
            raise ValueError("speculative_config.model: a draft model is not served with a target of several KV "
                             "cache groups (sliding-window and full layers) yet.")
        self.config = config
        self.model_config = config.speculative.draft_model_config
        self.device = device
        self.block_size = config.cache.block_size
        self.vocab_size = self.model_config.vocab_size
        self.attn_backend = attn_backend
        self.model = self._build_model(target)
        self.staging = HostStaging(device, slots=8)
        self.kv_cache: Optional[KVCache] = None
        self.graph_runner = None  # CUDAGraphRunner of the draft's decode and verify steps (CUDA, unless enforce_eager)

    def _build_model(self, target: "nn.Module") -> "nn.Module":
        from vllm_engine.model_loader import get_model

        return get_model(self.model_config, self.device, self.attn_backend)

    # ---- KV cache ------------------------------------------------------------------------------
    def kv_cache_spec(self) -> KVCacheSpec:
        """The draft's layers and KV heads per block (per-head K/V only)."""
        attn = [m for m in self.model.modules() if isinstance(m, Attention)]
        if not attn or {a.cache_layout for a in attn} != {"kv"}:
            raise ValueError(f"speculative_config.model: {self.model_config.model!r} needs a per-head K/V cache "
                             "(its attention layers have none, or another layout).")
        dtype = self.config.cache.cache_dtype or self.model_config.dtype
        return KVCacheSpec(len(attn), attn[0].num_kv_heads, attn[0].head_dim, self.block_size, dtype)

    def allocate(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        """The draft's cache: as many blocks as the target's (same ids); on CUDA its decode graphs
        and its warm-ups (attention variants of eager steps, the LM head at every proposing batch)."""
        self.kv_cache = KVCache.allocate(self.config, self.kv_cache_spec(), num_gpu_blocks, num_cpu_blocks,
                                         self.device)
        if self.device.type != "cuda":
            return
        hf, max_len = self.model_config.hf_config, self.model_config.max_model_len
        if not self.config.device.enforce_eager:
            from vllm_engine.worker.cuda_graphs import CUDAGraphRunner

            self.graph_runner = CUDAGraphRunner(
                self.model, self.kv_cache.gpu_caches, self.config.scheduler.max_num_seqs, max_len, self.block_size,
                hf.hidden_size, self.model_config.dtype, self.device, stage_input=self.takes_hidden,
                verify_query_len=self.config.speculative.verify_query_len,
                max_num_batched_tokens=self.config.scheduler.max_num_batched_tokens)
            self.graph_runner.capture()
        if hasattr(self.attn_backend, "warmup"):
            self.attn_backend.warmup(self.kv_cache.gpu_caches[0], hf.num_attention_heads, max_len,
                                     query_dtype=self.model_config.dtype)
        max_rows, b, rows = self.config.scheduler.max_num_seqs, 1, set()
        while b < 2 * max_rows:  # the LM head's row buckets, as ModelRunner._warm_lm_head
            rows.update(r for r in (min(b, max_rows), min(b, max_rows) - 1) if r >= 1)
            b *= 2
        with torch.inference_mode():
            for n in sorted(rows):
                self.model.compute_logits(torch.zeros(n, hf.hidden_size, dtype=self.model_config.dtype,
                                                      device=self.device))

    def profile_reserve(self) -> torch.Tensor:
        """What a proposing step holds at most beyond the forwards: the draft distributions of
        every request's k proposals, [max_num_seqs * k, V] float32 (the runner's memory profile
        allocates it, so the KV budget leaves room for it)."""
        rows = self.config.scheduler.max_num_seqs * self.config.speculative.num_speculative_tokens
        return torch.empty(rows, self.vocab_size, dtype=torch.float32, device=self.device)

    def move_blocks(self, msg: "ExecuteModelRequest") -> None:
        """The step's swaps and copy-on-write copies, on the draft's cache (as on the target's)."""
        self.kv_cache.swap_out(msg.blocks_to_swap_out)
        self.kv_cache.swap_in(msg.blocks_to_swap_in)
        self.kv_cache.copy_blocks(msg.blocks_to_copy)

    def finish(self, req_ids) -> None:
        """Requests that are gone (a proposer keeping per-request state drops it)."""

    # ---- forwards ------------------------------------------------------------------------------
    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's output hidden states [n, H]; ``hidden``: the input features (EAGLE)."""
        stage = None if hidden is None else IntermediateTensors(hidden, hidden)
        graphs = self.graph_runner
        if graphs is not None and graphs.fits(meta):
            return graphs.run(input_ids, positions, meta, stage)
        return self.model(input_ids, positions, self.kv_cache.gpu_caches, meta, stage)

    def forward_step(self, inputs: "StepInputs", hidden: torch.Tensor, states: Sequence["CachedRequestState"],
                     verified) -> None:
        """After the target's forward of a step (``hidden``: its output): the draft over the same
        flat batch, so its K/V lands in the same slots as the target's. Its output is not used."""
        self._run(inputs.input_ids, inputs.positions, inputs.attn_metadata)

    def propose(self, states: Sequence["CachedRequestState"], spec: dict[str, list[int]],
                host_tables: "HostBlockTables",
                seeded: Callable[[list["CachedRequestState"]], dict[int, torch.Generator]]
                ) -> tuple[dict[str, list[int]], Optional[torch.Tensor]]:
        """Draft tokens for the requests of ``spec`` (request id -> one placeholder per token to
        propose; each request's last token is known and not computed yet).

        ``states``: the step's request states; ``host_tables``: the runner's block tables;
        ``seeded(states)``: index -> generator of the seeded requests among ``states``. Returns
        (request id -> its draft tokens, draft_probs [D, V] float32 on the device: the proposal
        distribution of each draft, requests in ``states`` order, or None when every proposing
        request is greedy; rows of greedy requests are not filled: the rejection sampler ignores
        them)."""
        props = [st for st in states if spec.get(st.req_id)]
        counts = np.fromiter((len(spec[st.req_id]) for st in props), dtype=np.int64, count=len(props))
        last = np.fromiter((st.token_ids[st.num_computed_tokens] for st in props), dtype=np.int64, count=len(props))
        if (last == PLACEHOLDER_TOKEN_ID).any():
            raise RuntimeError("a draft model proposes after a token that is not known yet")
        tables, _ = host_tables.gather([st.req_id for st in props])
        ctx = ProposeContext(props, counts, tables, seeded(props), self.vocab_size, self.device,
                              self.position_offset)
        drafts = torch.zeros(len(props), int(counts.max()), dtype=torch.int64, device=self.device)
        ctx.hidden = self._first_hidden(props, ctx)
        for j in range(drafts.shape[1]):
            self._propose_one(ctx, last, drafts, j)
        host = drafts.tolist()
        return {st.req_id: host[b][: counts[b]] for b, st in enumerate(props)}, ctx.probs

    def _first_hidden(self, props: list["CachedRequestState"], ctx: "ProposeContext") -> Optional[torch.Tensor]:
        """The first proposing forward's input features [B, H] (None: the model takes none)."""
        return None

    def _propose_one(self, ctx: "ProposeContext", last: np.ndarray, drafts: torch.Tensor, j: int) -> None:
        """The j-th draft of every request proposing more than j: one decode forward of the draft
        over the previous draft (the last token when j = 0), at position L - 1 + j (+ the offset);
        with input features (``ctx.hidden``, [B, H]), each row's output replaces its features."""
        rows = np.flatnonzero(ctx.counts > j)
        n = rows.size
        pos = ctx.pos0[rows] + j
        bs = self.block_size
        slots = ctx.tables[rows, pos // bs].astype(np.int64) * bs + pos % bs
        if j == 0:
            slots[ctx.no_first_write[rows]] = -1
        random = rows[ctx.random[rows]]
        rand_idx = np.flatnonzero(ctx.random[rows])  # their index among this forward's rows
        (first_ids, pos_d, qsl_d, lens_d, tables_d, slots_d, rows_d, rand_idx_d, prob_rows_d, temps_d) = \
            self.staging.stage(last[rows], pos, np.arange(n + 1, dtype=np.int32), (pos + 1).astype(np.int32),
                               ctx.tables[rows], slots, rows, rand_idx, ctx.first[random] + j,
                               ctx.temperature[random])
        ids = first_ids if j == 0 else drafts[:, j - 1].index_select(0, rows_d)
        meta = AttentionMetadata(
            num_actual_tokens=n, num_seqs=n, query_start_loc=qsl_d, seq_lens=lens_d, block_tables=tables_d,
            slot_mapping=slots_d, max_query_len=1, max_seq_len=int(pos.max()) + 1,
            query_start_loc_cpu=list(range(n + 1)), seq_lens_cpu=(pos + 1).tolist())
        hidden = None if ctx.hidden is None else ctx.hidden.index_select(0, rows_d)
        out = self._run(ids, pos_d, meta, hidden)
        if ctx.hidden is not None:
            ctx.hidden.index_copy_(0, rows_d, out)
        logits = self.model.compute_logits(out)
        tokens = logits.argmax(dim=-1)
        if random.size:
            q = torch.softmax(logits.index_select(0, rand_idx_d).float() / temps_d.unsqueeze(1), dim=-1)
            ctx.probs.index_copy_(0, prob_rows_d, q)
            gens = {i: ctx.generators[int(b)] for i, b in enumerate(random) if int(b) in ctx.generators}
            tokens.index_copy_(0, rand_idx_d, exponential_race(q, gens))
        drafts[:, j].index_copy_(0, rows_d, tokens)


class ProposeContext:
    """One ``propose`` call's per-request arrays (index b: the b-th proposing request)."""

    def __init__(self, props: list["CachedRequestState"], counts: np.ndarray, tables: np.ndarray,
                 generators: dict[int, torch.Generator], vocab_size: int, device: torch.device,
                 position_offset: int = 0) -> None:
        self.counts = counts
        self.tables = tables
        self.generators = generators
        self.pos0 = np.fromiter((st.num_computed_tokens + position_offset for st in props), dtype=np.int64,
                                count=len(props))
        self.hidden: Optional[torch.Tensor] = None  # the model's input features per request (EAGLE)
        self.no_first_write = np.zeros(len(props), dtype=np.bool_)  # first forward's K/V not kept (slot -1)
        self.random = np.fromiter((not st.sampling_params.greedy for st in props), dtype=np.bool_, count=len(props))
        self.temperature = np.fromiter((st.sampling_params.temperature for st in props), dtype=np.float32,
                                       count=len(props))
        self.first = np.cumsum(counts) - counts  # each request's first draft among all D
        self.probs = (torch.zeros(int(counts.sum()), vocab_size, dtype=torch.float32, device=device)
                      if self.random.any() else None)
