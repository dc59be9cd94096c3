"""sliding_window_memory.py runs on the CPU (no model) and measures what KV cache groups save on a
chunked long-context run at Gemma 2 and Gemma 3 shapes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sliding_window_memory  # noqa: E402


def test_kv_cache_groups_hold_less_than_full_attention():
    gemma3 = sliding_window_memory.measure("gemma-3-27b", num_requests=2, prompt_len=4096, output_len=128, budget=1024)
    # Full attention holds every token in all 62 layers: 2 x cdiv(4096 + 127, 16) blocks at the end, at most.
    layer_block_gib = 2 * 16 * 128 * 16 * 2 / 2**30
    assert gemma3["full_attention_peak_gib"] <= round(2 * 264 * 62 * layer_block_gib, 3)
    assert gemma3["kv_cache_groups"] == 7 and gemma3["layers_per_block"] == 10
    assert gemma3["saved_fraction"] > 0.4  # window 1024 of 4k tokens in 52 of 62 layers (0.49)
    gemma2 = sliding_window_memory.measure("gemma-2-9b", num_requests=2, prompt_len=6144, output_len=128, budget=1024)
    assert gemma2["kv_cache_groups"] == 2 and 0.1 < gemma2["saved_fraction"] < 0.5  # half the layers, window 4096
