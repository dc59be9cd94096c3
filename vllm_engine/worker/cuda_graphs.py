"""CUDA graphs for decode-only steps and for steps verifying speculative proposals.

A decode step at batch size B launches hundreds of small kernels; on a fast GPU the launch overhead
(CPU time) would exceed the GPU time. We capture the model forward once per batch-size bucket
(1, 2, 4, 8, 16, 24, ... up to max_num_seqs), largest first so all graphs share one memory pool,
and replay the smallest bucket that holds the batch. Inputs go through persistent buffers: the
real rows are copied in, the padding rows get slot -1 (nothing written) and a 1-token context in
block 0 (a harmless read).

The attention backend sees the same metadata on every replay of a graph: the kernels' launch plan
may depend only on the batch size and ``max_seq_len``, which is fixed to ``max_model_len`` here.

Verify graphs (speculative decoding, ``verify_query_len`` q = k + 1): a step in which every
sequence has at most q query tokens (a decode and its proposals) replays a graph captured for
(batch bucket, q). Each sequence is padded to q rows: sequence i owns rows i*q .. i*q + q - 1, its
real tokens first; its context length becomes (tokens before the step) + q, so the real rows keep
their positions and the padded rows sit after them, attended by nobody, with slot -1 (not written).
``query_start_loc`` is i*q and ``max_query_len`` q on every replay, so the backend's multi-token
path has a launch plan that depends only on (batch, q). The output is gathered back to the step's
unpadded rows (and so are ``token_row_buffers``, e.g. EAGLE-3's auxiliary hidden states).

A model with several KV cache groups (Gemma 2/3) has a block-table and a slot-mapping buffer per
group; each group's layers read their own (``AttentionMetadata.groups``).

A pipeline stage captures its own layers: a stage after the first reads the previous stage's
(hidden states, residual) from persistent buffers, and a stage before the last returns its own pair
(``IntermediateTensors``) from the graph's output memory; the stages' send and receive stay outside
the graphs.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from vllm_engine.attention.backend import AttentionMetadata, block_table_width
from vllm_engine.distributed import IntermediateTensors
from vllm_engine.layers.parallel_compile import compile_ahead

logger = logging.getLogger(__name__)

ModelOutput = Union[torch.Tensor, IntermediateTensors]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, max_num_seqs + 8, 8))
    return sorted({min(s, max_num_seqs) for s in sizes})


def _buckets(sizes: list[int], max_bs: int) -> list[Optional[int]]:
    """[max_bs + 1]: for each batch size, the smallest of ``sizes`` that holds it (None: none)."""
    return [next((s for s in sizes if s >= n), None) for n in range(max_bs + 1)]


class CUDAGraphRunner:
    """Decode graphs of ``model`` (and verify graphs when ``verify_query_len`` > 1); ``stage_input``:
    the model is a pipeline stage after the first (or an EAGLE head), which starts from given
    hidden states and residual. ``max_num_batched_tokens`` bounds a verify graph's padded tokens;
    ``token_row_buffers``: tensors the model writes one row per input token of (row r of a forward
    at row r), put back in the step's row order after a verify replay."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], max_num_seqs: int, max_model_len: int,
                 block_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 stage_input: bool = False, num_kv_groups: int = 1, verify_query_len: int = 0,
                 max_num_batched_tokens: Optional[int] = None,
                 token_row_buffers: Sequence[torch.Tensor] = ()) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        max_bs = self.batch_sizes[-1]
        q = verify_query_len if verify_query_len > 1 else 0
        token_limit = max_num_batched_tokens or max_bs * q
        self.verify_query_len = q
        self.verify_batch_sizes = [bs for bs in self.batch_sizes if q and bs * q <= token_limit]
        # The bucket of each batch size 0..max_bs, looked up every step (None: past the largest).
        self._bucket_of = _buckets(self.batch_sizes, max_bs)
        self._verify_bucket_of = _buckets(self.verify_batch_sizes, max_bs)
        max_tokens = max([max_bs] + [bs * q for bs in self.verify_batch_sizes])
        max_blocks = block_table_width(-(-max_model_len // block_size))
        self.input_ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.num_kv_groups = num_kv_groups
        # Every group's slot mappings and tables; group 0's are also ``slot_mapping`` / ``block_tables``.
        self.group_slot_mapping = torch.full((num_kv_groups, max_tokens), -1, dtype=torch.long, device=device)
        self.group_block_tables = torch.zeros(num_kv_groups, max_bs, max_blocks, dtype=torch.int32, device=device)
        self.slot_mapping = self.group_slot_mapping[0]
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = self.group_block_tables[0]
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.verify_query_start_loc = self.query_start_loc * max(q, 1)
        # The decode kernel's program order (longest sequence first); padding rows last, in index order.
        self.decode_order = torch.arange(max_bs, dtype=torch.int32, device=device)
        self.arange = torch.arange(max_bs, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, ModelOutput]] = {}
        self.verify_graphs: dict[int, tuple[torch.cuda.CUDAGraph, ModelOutput]] = {}
        self.token_row_buffers = list(token_row_buffers)
        self.hidden_size, self.dtype = hidden_size, dtype
        self.stage_input = (IntermediateTensors(torch.zeros(max_tokens, hidden_size, dtype=dtype, device=device),
                                                torch.zeros(max_tokens, hidden_size, dtype=dtype, device=device))
                            if stage_input else None)

    # ---- metadata the graphs are captured with --------------------------------------------------
    def _metadata(self, bs: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            num_actual_tokens=bs, num_seqs=bs, query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
            max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[self.max_model_len] * bs,
            decode_order=self.decode_order[:bs],
        )
        if self.num_kv_groups > 1:
            meta = meta.with_groups(self.group_block_tables[:, :bs], self.group_slot_mapping[:, :bs])
        return meta

    def _verify_metadata(self, bs: int, seq_lens_cpu: Optional[list[int]] = None) -> AttentionMetadata:
        """``bs`` sequences of q query rows each. ``seq_lens_cpu``: the host copy of the padded lengths
        (eager runs, for backends that read it); a graph is captured with ``max_model_len`` each."""
        q = self.verify_query_len
        tokens = bs * q
        meta = AttentionMetadata(
            num_actual_tokens=tokens, num_seqs=bs, query_start_loc=self.verify_query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:tokens],
            max_query_len=q, max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(0, (bs + 1) * q, q)),
            seq_lens_cpu=seq_lens_cpu if seq_lens_cpu is not None else [self.max_model_len] * bs,
        )
        if self.num_kv_groups > 1:
            meta = meta.with_groups(self.group_block_tables[:, :bs], self.group_slot_mapping[:, :tokens])
        return meta

    def _capture_args(self, bs: int, q: int) -> tuple:
        """The model's arguments for the graph of ``bs`` sequences of ``q`` query tokens."""
        tokens = bs * q
        if q > 1:
            self.seq_lens[:bs].fill_(q)  # a context of q tokens (the real lengths come at replay)
        meta = self._metadata(bs) if q == 1 else self._verify_metadata(bs)
        return self.input_ids[:tokens], self.positions[:tokens], self.kv_caches, meta, self._stage_input(tokens)

    @torch.inference_mode()
    def capture(self) -> None:
        """Every decode graph, then (largest token count first, one memory pool) every verify graph.

        First every graph's forward runs once inside ``compile_ahead``: the Triton variants they
        launch (and the linear picker's candidates) compile side by side, and nothing is computed
        (the capture's inputs are placeholders anyway). The capture loop then only times the
        picker's candidates and captures."""
        t0 = time.time()
        free_before = torch.cuda.mem_get_info()[0]
        plans = [(bs, 1) for bs in self.batch_sizes] + [(bs, self.verify_query_len) for bs in self.verify_batch_sizes]
        plans.sort(key=lambda p: (p[0] * p[1], p[1]), reverse=True)
        with compile_ahead() as ahead:
            if ahead:
                for bs, q in plans:
                    self.model(*self._capture_args(bs, q))
        pool = None
        stream = torch.cuda.Stream()
        for bs, q in plans:
            args = self._capture_args(bs, q)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: compiles / autotunes kernels outside the capture
                    self.model(*args)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(*args)
            pool = graph.pool()
            (self.graphs if q == 1 else self.verify_graphs)[bs] = (graph, out)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes %d..%d%s) in %.1fs using %.2f GiB",
                    len(self.graphs) + len(self.verify_graphs), self.batch_sizes[0], self.batch_sizes[-1],
                    f"; {len(self.verify_graphs)} verifying {self.verify_query_len} tokens per sequence"
                    if self.verify_graphs else "", time.time() - t0,
                    (free_before - torch.cuda.mem_get_info()[0]) / 2**30)

    # ---- which graph ----------------------------------------------------------------------------
    def bucket(self, num_seqs: int) -> Optional[int]:
        return self._bucket_of[num_seqs] if num_seqs < len(self._bucket_of) else None

    def verify_bucket(self, meta: AttentionMetadata) -> Optional[int]:
        """The verify graph's batch size for a step whose sequences each have at most q query tokens
        and whose padded rows stay below ``max_model_len``; None: no verify graph fits."""
        q = self.verify_query_len
        if not q or not 1 < meta.max_query_len <= q or meta.max_seq_len + q - 1 > self.max_model_len:
            return None
        n = meta.num_seqs
        return self._verify_bucket_of[n] if n < len(self._verify_bucket_of) else None

    def fits(self, meta: AttentionMetadata) -> bool:
        """A graph of this runner can run the step (``run``)."""
        if meta.is_decode_only:
            return self.bucket(meta.num_seqs) in self.graphs
        return meta.query_start_loc_cpu is not None and self.verify_bucket(meta) in self.verify_graphs

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            stage_input: Optional[IntermediateTensors] = None) -> ModelOutput:
        """The step (``fits(meta)``) by graph replay: the model's output for the step's rows (hidden
        states [num tokens, H], or a stage's ``IntermediateTensors``). A stage after the first (an
        EAGLE head) passes its input hidden states as ``stage_input``."""
        if meta.is_decode_only:
            return self._run_decode(input_ids, positions, meta, stage_input)
        bs = self.verify_bucket(meta)
        dest = self._load_verify_inputs(input_ids, positions, meta, stage_input, bs)
        graph, out = self.verify_graphs[bs]
        graph.replay()
        return self._unpad(out, dest)

    # ---- decode ---------------------------------------------------------------------------------
    def _stage_input(self, rows: int) -> Optional[IntermediateTensors]:
        if self.stage_input is None:
            return None
        return IntermediateTensors(self.stage_input.hidden_states[:rows], self.stage_input.residual[:rows])

    @staticmethod
    def _groups(meta: AttentionMetadata) -> tuple[AttentionMetadata, ...]:
        """Each KV cache group's metadata (one group: ``meta`` itself)."""
        return meta.groups if meta.groups is not None else (meta,)

    def _load_tables(self, meta: AttentionMetadata, n: int, bs: int) -> None:
        """Every group's block tables into the buffers; the padding sequences up to ``bs`` read block 0."""
        for g, group in enumerate(self._groups(meta)):
            self.group_block_tables[g, :n, :group.block_tables.shape[1]].copy_(group.block_tables)
        if bs > n:
            self.group_block_tables[:, n:bs, 0].zero_()

    def _run_decode(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    stage_input: Optional[IntermediateTensors]) -> ModelOutput:
        """Decode step for ``meta.num_seqs`` sequences (one token each)."""
        n = meta.num_seqs
        bs = self.bucket(n)
        graph, out = self.graphs[bs]
        if self.stage_input is not None:
            self.stage_input.hidden_states[:n].copy_(stage_input.hidden_states)
            self.stage_input.residual[:n].copy_(stage_input.residual)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        for g, group in enumerate(self._groups(meta)):
            self.group_slot_mapping[g, :n].copy_(group.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self._load_tables(meta, n, bs)
        if meta.decode_order is not None:
            self.decode_order[:n].copy_(meta.decode_order)
        else:
            self.decode_order[:n].copy_(self.arange[:n])
        if bs > n:
            self.decode_order[n:bs].copy_(self.arange[n:bs])
            self.group_slot_mapping[:, n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        graph.replay()
        if isinstance(out, IntermediateTensors):
            return IntermediateTensors(out.hidden_states[:n], out.residual[:n])
        return out[:n]

    # ---- verify ---------------------------------------------------------------------------------
    def _load_verify_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                            stage_input: Optional[IntermediateTensors], bs: int) -> torch.Tensor:
        """Writes the step into the buffers padded to q rows per sequence (``bs`` sequences, the
        real ones first); returns each real row's padded row, int64 [num tokens] on the device."""
        n, total, q = meta.num_seqs, meta.num_actual_tokens, self.verify_query_len
        qsl = np.asarray(meta.query_start_loc_cpu[: n + 1], dtype=np.int64)
        counts = np.diff(qsl)
        # Row j of sequence i goes to i*q + j; the padded lengths follow: one host-to-device copy.
        host = np.empty(total + n, dtype=np.int64)
        host[:total] = np.arange(total) + np.repeat(np.arange(n) * q - qsl[:-1], counts)
        host[total:] = q - counts
        both = torch.from_numpy(host).to(self.input_ids.device, non_blocking=True)
        dest, extra = both[:total], both[total:]
        tokens = bs * q
        self.group_slot_mapping[:, :tokens].fill_(-1)
        for g, group in enumerate(self._groups(meta)):
            self.group_slot_mapping[g].index_copy_(0, dest, group.slot_mapping)
        self.input_ids.index_copy_(0, dest, input_ids)
        self.positions.index_copy_(0, dest, positions)
        torch.add(meta.seq_lens, extra, out=self.seq_lens[:n])
        if bs > n:
            self.seq_lens[n:bs].fill_(q)
        self._load_tables(meta, n, bs)
        if self.stage_input is not None:
            self.stage_input.hidden_states.index_copy_(0, dest, stage_input.hidden_states)
            self.stage_input.residual.index_copy_(0, dest, stage_input.residual)
        return dest

    def _unpad(self, out: ModelOutput, dest: torch.Tensor) -> ModelOutput:
        """A verify forward's output (and ``token_row_buffers``) back in the step's row order."""
        for buf in self.token_row_buffers:
            buf[: dest.shape[0]].copy_(buf.index_select(0, dest))
        if isinstance(out, IntermediateTensors):
            return IntermediateTensors(out.hidden_states.index_select(0, dest), out.residual.index_select(0, dest))
        return out.index_select(0, dest)

    def run_verify_eager(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                         stage_input: Optional[IntermediateTensors] = None) -> ModelOutput:
        """What a verify graph's replay computes, run eagerly on the padded buffers (any device; the
        tests check the padding against the unpadded forward without a GPU)."""
        bs = self.verify_bucket(meta)
        dest = self._load_verify_inputs(input_ids, positions, meta, stage_input, bs)
        q, n = self.verify_query_len, meta.num_seqs
        qsl = meta.query_start_loc_cpu
        lens = [meta.seq_lens_cpu[i] - (qsl[i + 1] - qsl[i]) + q for i in range(n)] + [q] * (bs - n)
        tokens = bs * q
        out = self.model(self.input_ids[:tokens], self.positions[:tokens], self.kv_caches,
                         self._verify_metadata(bs, lens), self._stage_input(tokens))
        return self._unpad(out, dest)
