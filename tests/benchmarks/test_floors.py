"""The benchmarks' lower bounds (common.py), against hand-computed values."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (attention_flops, decode_floor_seconds, kv_bytes_per_token, linear_flops_per_token,  # noqa: E402
                    roofline_floor_seconds, weight_bytes)

LLAMA_8B = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)


def test_llama_8b_sizes():
    per_layer = 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # q, o, k+v, gate/up/down
    assert linear_flops_per_token(LLAMA_8B) == 2 * 32 * per_layer == 13_958_643_712
    assert weight_bytes(LLAMA_8B) == 2 * (32 * per_layer + 128256 * 4096)
    assert kv_bytes_per_token(LLAMA_8B) == 2 * 32 * 8 * 128 * 2  # K and V, all layers, bf16
    # 3 tokens at positions 0, 1, 2 see 1 + 2 + 3 keys; QK^T and PV are 2 FLOPs per multiply-add each.
    assert attention_flops(LLAMA_8B, 0, 3) == 4 * 32 * 32 * 128 * 6
    assert attention_flops(LLAMA_8B, 1, 3) == 4 * 32 * 32 * 128 * 5


def test_roofline_floor():
    ins, outs = [100, 300, 50], [20, 5, 40]
    bw = 3000.0
    base = decode_floor_seconds(ins, outs, LLAMA_8B, bw, max_num_seqs=2)
    # Unbounded compute: only the bytes count, as in the decode floor.
    assert roofline_floor_seconds(ins, outs, LLAMA_8B, bw, 1e12, 2) == pytest.approx(base, rel=1e-6)
    # One sequence, one step, compute-bound at a tiny peak: the step's matmuls + the prefill.
    peak = 1e-3  # TFLOPS
    lin = linear_flops_per_token(LLAMA_8B) + 2 * 128256 * 4096
    prefill = 10 * linear_flops_per_token(LLAMA_8B) + 2 * 128256 * 4096 + attention_flops(LLAMA_8B, 0, 10)
    want = (prefill + lin) / (peak * 1e12) + kv_bytes_per_token(LLAMA_8B) * 10 / (bw * 1e9)
    assert roofline_floor_seconds([10], [1], LLAMA_8B, bw, peak, 1) == pytest.approx(want, rel=1e-9)


def test_gpu_timeline_splits_host_waits_from_gpu_work():
    """gpu_timeline.summarize: gaps between steps and the start-to-forward time (input copies, the GPU
    waiting for the host) are kept apart from the forward's own time."""
    import gpu_timeline

    class Ev:
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, other):
            return other.ms - self.ms

    # step 1: decode of 4 seqs, start 0, forward 1, end 5; step 2: mixed, start 7 (2 ms gap), forward 7.5, end 10
    tl = [(4, 4, Ev(0), Ev(1), Ev(5)), (3, 40, Ev(7), Ev(7.5), Ev(10))]
    out = gpu_timeline.summarize(tl, wall_s=0.01)
    assert out["busy_s"] == pytest.approx((4 + 2.5) / 1e3)
    assert out["inputs_s"] == pytest.approx(1.5 / 1e3) and out["idle_s"] == pytest.approx(2 / 1e3)
    assert out["mixed"]["idle_before_s"] == pytest.approx(2 / 1e3) and out["decode"]["inputs_s"] == pytest.approx(1e-3)
    assert out["decode_by_batch"][0]["batch"] == "1-16" and out["decode_by_batch"][0]["busy_ms_median"] == 4


def test_schedule_model_runs_every_request_to_its_length():
    from schedule_model import Gpu, simulate

    ins, outs = [100, 300, 50, 700], [20, 5, 40, 3]
    gpu = Gpu()
    # Budget 256, cap 2: prompts are chunked, requests wait for a slot, each produces exactly its tokens.
    r = simulate(LLAMA_8B, gpu, ins, outs, max_num_batched_tokens=256, max_num_seqs=2)
    assert r["produced"] == outs
    # A big budget and cap: every prompt in step 1 (its first token too), then max(outs) - 1 decode steps.
    r = simulate(LLAMA_8B, gpu, ins, outs, max_num_batched_tokens=10_000, max_num_seqs=8)
    assert r["steps"] == max(outs) and r["produced"] == outs


def test_schedule_model_step_price():
    from schedule_model import Gpu, step_seconds

    gpu = Gpu(bandwidth_gbs=1000.0, gemm_tflops=100.0, gemm_bw_eff=0.5, attn_tflops=10.0, step_fixed_s=1e-3)
    lm = 2 * 128256 * 4096
    layers = weight_bytes(LLAMA_8B) - lm
    # One decode row: the weights and the LM head are read, the KV of 1,000 tokens, no FLOP bound.
    want = layers / 0.5e12 + lm / 1e12 + 1000 * kv_bytes_per_token(LLAMA_8B) / 1e12 + 1e-3
    assert step_seconds(LLAMA_8B, gpu, 1, 1, 1000, 0.0) == pytest.approx(want)
    # 8,192 prompt rows: the matmuls' FLOPs bound the GEMMs; prefill attention at its own rate.
    want = 8192 * linear_flops_per_token(LLAMA_8B) / 1e14 + lm / 1e12 + 5e12 / 1e13 + 1e-3
    assert step_seconds(LLAMA_8B, gpu, 8192, 1, 0, 5e12) == pytest.approx(want)
