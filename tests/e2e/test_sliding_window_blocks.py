"""Sliding-window models free the KV blocks that fell out of the window (tiny Mistral, window 16):
greedy tokens of generations four times longer than the window equal HF transformers', while each
request holds a bounded number of blocks however long it grows (the memory a full-attention cache
would need grows with the sequence)."""

from __future__ import annotations

import pytest
import torch

from e2e.test_engine_vs_hf import hf_greedy
from vllm_engine import Engine, SamplingParams

BLOCK = 4
WINDOW = 16


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_long_generations_match_hf_with_blocks_freed(tiny_model_dir, async_scheduling):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("mistral")
    engine = Engine(model=str(path), dtype="float32", block_size=BLOCK, max_model_len=256,
                    max_num_batched_tokens=24, max_num_seqs=8, num_gpu_blocks_override=64, seed=0,
                    async_scheduling=async_scheduling)
    assert engine.config.cache.sliding_window == WINDOW
    prompts = ["The quick brown fox jumps over the lazy dog and keeps running far away",
               "Hello, my name is", "One two three four five six seven"]
    ids = [engine.tokenize(p) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i, p in enumerate(ids):
        engine.add_request(str(i), p, params)
    peak_used, outs = 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
        kv = engine.scheduler.kv_cache_manager
        for r in engine.scheduler.running:
            # the window's 16 keys (up to 5 blocks of 4) + one step's new tokens (24: 6 blocks) + 1
            assert kv.num_blocks_held(r) <= 12
        stats = engine.get_stats()
        peak_used = max(peak_used, stats.num_total_blocks - stats.num_free_blocks)
    engine.scheduler.check_integrity()
    # Full attention would hold every token: (prompt + 64) / 4 blocks per request, 3 requests at once.
    full = sum(-(-(len(p) + 64) // BLOCK) for p in ids)
    print(f"peak KV blocks in use: {peak_used} (full attention: {full})")
    assert peak_used <= 3 * 12 < full
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for i, p in enumerate(ids):
        assert outs[str(i)] == hf_greedy(hf, p, 64)[0], i
