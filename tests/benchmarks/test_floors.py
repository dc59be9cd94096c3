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
