"""kv_cache_dtype="fp8": the runner allocates an e4m3 cache (a quarter of float32's bytes per block:
four times the blocks in the same space), block moves (swap) keep its bytes, and
the model's outputs stay close to the full-precision cache's; bad values name the field."""

from __future__ import annotations

import pytest
import torch

from vllm_engine import Engine, SamplingParams

KW = dict(dtype="float32", max_model_len=128, seed=0, block_size=4)


def test_fp8_cache_quadruples_float32_blocks_and_stays_close(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    full = Engine(model=path, num_gpu_blocks_override=64, **KW)  # (a GPU's memory would give millions)
    fp8 = Engine(model=path, kv_cache_dtype="fp8", preemption_mode="swap", swap_space=0.001,
                 max_num_seqs=4, max_num_batched_tokens=8, num_gpu_blocks_override=14, **KW)
    cache = fp8.model_runner.kv_cache
    assert cache.gpu_caches[0].dtype == torch.float8_e4m3fn and cache.cpu_caches[0].dtype == torch.float8_e4m3fn
    spec, full_spec = fp8.model_runner.kv_cache_spec(), full.model_runner.kv_cache_spec()
    assert 4 * spec.bytes_per_block == full_spec.bytes_per_block
    assert cache.gpu_caches[0].numel() * 1 == 14 * spec.bytes_per_block // spec.num_layers
    prompts = ["Hello, my name is", "The capital of France is a city that", "One two three four five six"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    ref = full.generate(prompts, params, use_tqdm=False)
    got = fp8.generate(prompts * 3, params, use_tqdm=False)  # 9 requests on few blocks: swapped
    assert fp8.get_stats().num_swaps_total > 0
    for r, g in zip(ref * 3, got):
        a = [d[t].logprob for d, t in zip(g.prompt_logprobs[1:], g.prompt_token_ids[1:])]
        b = [d[t].logprob for d, t in zip(r.prompt_logprobs[1:], r.prompt_token_ids[1:])]
        diffs = [abs(x - y) for x, y in zip(a, b)]
        # e4m3 keeps 3 mantissa bits (6% per element); reading wrong bytes would cost nats, not tenths
        assert max(diffs) < 0.25 and sum(diffs) / len(diffs) < 0.05
    # Repeated prompts give the same tokens whether or not they were swapped out in between.
    assert [o.token_ids for o in got] == [o.token_ids for o in got[:3]] * 3
    fp8.scheduler.check_integrity()


def test_bad_kv_cache_dtype_names_the_field(tiny_model_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Engine(model=str(tiny_model_dir("llama")), kv_cache_dtype="int4", **KW)
