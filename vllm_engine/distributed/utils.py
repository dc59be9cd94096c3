"""Arithmetic of splitting a model across ranks, and what passes between pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def divide(numerator: int, denominator: int, what: str = "") -> int:
    """``numerator // denominator``; ValueError when it does not divide evenly."""
    if numerator % denominator:
        raise ValueError(f"{what or numerator} ({numerator}) is not divisible by the tensor-parallel size "
                         f"({denominator})")
    return numerator // denominator


def get_pp_indices(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """The layers [start, end) of pipeline stage ``pp_rank``: an even split, the first stages taking
    one more layer each when it does not divide."""
    if not 0 <= pp_rank < pp_size or pp_size > num_layers:
        raise ValueError(f"pipeline stage {pp_rank} of {pp_size} for a model of {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (pp_rank < extra)


def kv_heads_per_rank(total_num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds (and caches): split across ranks, or one replicated head per rank
    when there are fewer KV heads than ranks."""
    if tp_size >= total_num_kv_heads:
        divide(tp_size, total_num_kv_heads, "tensor-parallel size over the number of KV heads")
        return 1
    return divide(total_num_kv_heads, tp_size, "number of KV heads")


@dataclass
class IntermediateTensors:
    """What a pipeline stage hands the next one: the hidden states after its last layer and the
    residual stream before that layer (the next stage's first norm adds them), both [T, hidden]."""

    hidden_states: torch.Tensor
    residual: torch.Tensor
