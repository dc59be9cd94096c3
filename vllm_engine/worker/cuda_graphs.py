"""CUDA graphs for decode-only steps.

A decode step at batch size B launches hundreds of small kernels; on a fast GPU the launch overhead
(CPU time) would exceed the GPU time. We capture the model forward once per batch-size bucket
(1, 2, 4, 8, 16, 24, ... up to max_num_seqs), largest first so all graphs share one memory pool,
and replay the smallest bucket that holds the batch. Inputs go through persistent buffers: the
real rows are copied in, the padding rows get slot -1 (nothing written) and a 1-token context in
block 0 (a harmless read).

The attention backend sees the same metadata on every replay of a graph: the kernels' launch plan
may depend only on the batch size and ``max_seq_len``, which is fixed to ``max_model_len`` here.

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
from typing import Optional, Union

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionMetadata, block_table_width
from vllm_engine.distributed import IntermediateTensors

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, max_num_seqs + 8, 8))
    return sorted({min(s, max_num_seqs) for s in sizes})


class CUDAGraphRunner:
    """Decode graphs of ``model``; ``stage_input``: the model is a pipeline stage after the first,
    which starts from the previous stage's hidden states and residual."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], max_num_seqs: int, max_model_len: int,
                 block_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 stage_input: bool = False, num_kv_groups: int = 1) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        max_bs = self.batch_sizes[-1]
        max_blocks = block_table_width(-(-max_model_len // block_size))
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.num_kv_groups = num_kv_groups
        # Every group's slot mappings and tables; group 0's are also ``slot_mapping`` / ``block_tables``.
        self.group_slot_mapping = torch.full((num_kv_groups, max_bs), -1, dtype=torch.long, device=device)
        self.group_block_tables = torch.zeros(num_kv_groups, max_bs, max_blocks, dtype=torch.int32, device=device)
        self.slot_mapping = self.group_slot_mapping[0]
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = self.group_block_tables[0]
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        # The decode kernel's program order (longest sequence first); padding rows last, in index order.
        self.decode_order = torch.arange(max_bs, dtype=torch.int32, device=device)
        self.arange = torch.arange(max_bs, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Union[torch.Tensor, IntermediateTensors]]] = {}
        self.hidden_size, self.dtype = hidden_size, dtype
        self.stage_input = (IntermediateTensors(torch.zeros(max_bs, hidden_size, dtype=dtype, device=device),
                                                torch.zeros(max_bs, hidden_size, dtype=dtype, device=device))
                            if stage_input else None)

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

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.time()
        free_before = torch.cuda.mem_get_info()[0]
        pool = None
        stream = torch.cuda.Stream()
        for bs in reversed(self.batch_sizes):
            meta = self._metadata(bs)
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, meta, self._stage_input(bs))
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
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes %d..%d) in %.1fs using %.2f GiB",
                    len(self.graphs), self.batch_sizes[0], self.batch_sizes[-1], time.time() - t0,
                    (free_before - torch.cuda.mem_get_info()[0]) / 2**30)

    def bucket(self, num_seqs: int) -> Optional[int]:
        for bs in self.batch_sizes:
            if bs >= num_seqs:
                return bs
        return None

    def _stage_input(self, bs: int) -> Optional[IntermediateTensors]:
        if self.stage_input is None:
            return None
        return IntermediateTensors(self.stage_input.hidden_states[:bs], self.stage_input.residual[:bs])

    def _copy_other_groups(self, meta: AttentionMetadata, n: int, bs: int) -> None:
        """Groups 1.. of a model with several KV cache groups: their tables and slots into the buffers."""
        for g in range(1, self.num_kv_groups):
            group = meta.groups[g]
            self.group_slot_mapping[g, :n].copy_(group.slot_mapping)
            self.group_block_tables[g, :n, :group.block_tables.shape[1]].copy_(group.block_tables)
            if bs > n:
                self.group_slot_mapping[g, n:bs].fill_(-1)
                self.group_block_tables[g, n:bs, 0].zero_()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            stage_input: Optional[IntermediateTensors] = None) -> Union[torch.Tensor, IntermediateTensors]:
        """Decode step for ``meta.num_seqs`` sequences (one token each) by graph replay: the model's
        output for those rows (hidden states [n, H], or a stage's ``IntermediateTensors``). A stage
        after the first passes the previous stage's output as ``stage_input``."""
        n = meta.num_seqs
        bs = self.bucket(n)
        graph, out = self.graphs[bs]
        if self.stage_input is not None:
            self.stage_input.hidden_states[:n].copy_(stage_input.hidden_states)
            self.stage_input.residual[:n].copy_(stage_input.residual)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if meta.decode_order is not None:
            self.decode_order[:n].copy_(meta.decode_order)
        else:
            self.decode_order[:n].copy_(self.arange[:n])
        if bs > n:
            self.decode_order[n:bs].copy_(self.arange[n:bs])
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
            self.block_tables[n:bs, 0].zero_()
        if self.num_kv_groups > 1:
            self._copy_other_groups(meta, n, bs)
        graph.replay()
        if isinstance(out, IntermediateTensors):
            return IntermediateTensors(out.hidden_states[:n], out.residual[:n])
        return out[:n]
