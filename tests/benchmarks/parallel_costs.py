"""Lower bounds for a model spread over tp x pp GPUs, from the one-GPU bounds in common.py.

A tensor-parallel rank reads 1/tp of its stage's weights and (up to the number of KV heads, which
are replicated beyond it) 1/tp of its KV cache, and does 1/tp of the FLOPs: at tp the one-GPU bound
holds with tp times the bandwidth and the FLOP rate. Pipeline stages add capacity, not speed: with
pp micro-batches in flight a whole batch's step still reads every stage's weights once, one stage
after another. What tp adds is each layer's two all-reduces of [tokens, hidden] bf16, of which a
ring moves 2 (tp - 1) / tp over each GPU's link.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional

import torch

from common import fcfs_decode_steps, kv_bytes_per_token, roofline_floor_seconds, weight_bytes


def kv_split(hf_config: Any, tp: int) -> int:
    """How many ways tensor parallelism ``tp`` splits the KV cache (KV heads are replicated beyond it)."""
    heads = hf_config.num_attention_heads
    return min(tp, getattr(hf_config, "num_key_value_heads", None) or heads)


def allreduce_seconds_per_token(hf_config: Any, tp: int, link_gbs: Optional[float]) -> float:
    """Link time of one token's all-reduces: 2 per layer of ``hidden`` bf16 values, a ring moving
    2 (tp - 1) / tp of them over each GPU's link. 0 at tp=1 or without a measured link."""
    if tp == 1 or not link_gbs:
        return 0.0
    nbytes = 2 * hf_config.num_hidden_layers * hf_config.hidden_size * 2
    return nbytes * 2 * (tp - 1) / tp / (link_gbs * 1e9)


def parallel_roofline_seconds(input_lens: list[int], output_lens: list[int], hf_config: Any, bandwidth_gbs: float,
                              peak_tflops: float, max_num_seqs: int, tp: int, pp: int = 1,
                              link_gbs: Optional[float] = None) -> float:
    """``common.roofline_floor_seconds`` over tp x pp GPUs of ``bandwidth_gbs`` / ``peak_tflops``
    each, plus the all-reduces' link time and the reads of replicated KV heads (``pp`` changes
    nothing: see the module's docstring)."""
    del pp
    seconds = roofline_floor_seconds(input_lens, output_lens, hf_config, bandwidth_gbs * tp, peak_tflops * tp,
                                     max_num_seqs)
    split = kv_split(hf_config, tp)
    if split < tp:
        kv_read = sum(ctx for _, ctx in fcfs_decode_steps(input_lens, output_lens, max_num_seqs))
        seconds += kv_read * kv_bytes_per_token(hf_config) * (1 / split - 1 / tp) / (bandwidth_gbs * 1e9)
    return seconds + (sum(input_lens) + sum(output_lens)) * allreduce_seconds_per_token(hf_config, tp, link_gbs)


def decode_step_floor_seconds(hf_config: Any, batch: int, context: float, bandwidth_gbs: float, tp: int = 1,
                              link_gbs: Optional[float] = None) -> float:
    """One decode step of ``batch`` sequences of ``context`` tokens at tp: this rank's weights and KV
    over its bandwidth, plus the all-reduces over the link (their per-call latency is not counted:
    tests/benchmarks/allreduce_bench.py measures it)."""
    weights = weight_bytes(hf_config, num_tokens=batch) / tp
    reads = weights + batch * context * kv_bytes_per_token(hf_config) / kv_split(hf_config, tp)
    return reads / (bandwidth_gbs * 1e9) + batch * allreduce_seconds_per_token(hf_config, tp, link_gbs)


def measure_p2p_gbs(size_mib: int = 512, iters: int = 10) -> Optional[float]:
    """One-way copy bandwidth from GPU 0 to GPU 1 (a ring all-reduce's link), GB/s; None with fewer
    than two GPUs."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    a = torch.empty(size_mib * 2**20 // 2, dtype=torch.float16, device="cuda:0")
    b = torch.empty_like(a, device="cuda:1")
    times = []
    for _ in range(iters + 1):
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        times.append(time.perf_counter() - t0)
    return a.numel() * a.element_size() / statistics.median(times[1:]) / 1e9
