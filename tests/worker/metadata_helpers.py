"""Attention metadata for hand-made steps in the worker tests."""

from __future__ import annotations

import torch

from vllm_engine.attention.backend import AttentionMetadata


def step_metadata(starts: list[int], counts: list[int], tables: list[list[int]], block_size: int,
                  device: torch.device) -> AttentionMetadata:
    """A step in which sequence i has ``starts[i]`` tokens cached and ``counts[i]`` new ones, its
    blocks ``tables[i]`` (host copies included, as the model runner builds them)."""
    seq_lens = [s + c for s, c in zip(starts, counts)]
    qsl = [0]
    for c in counts:
        qsl.append(qsl[-1] + c)
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (s, c) in enumerate(zip(starts, counts)) for p in range(s, s + c)]
    return AttentionMetadata(
        num_actual_tokens=qsl[-1], num_seqs=len(starts),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(counts), max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
