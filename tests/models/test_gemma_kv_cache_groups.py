"""Gemma 2 and 3 free the KV blocks their sliding-window layers no longer need (KV cache groups);
so does Qwen2 with ``use_sliding_window`` (full layers below ``max_window_layers``, sliding above).

Tiny checkpoints (transformers' own config classes, ``save_pretrained``) with a 16-token window:
Gemma 2 alternates sliding and full layers (2 groups of 2 layers), Gemma 3 has five sliding layers
per full one (6 groups of 1 layer). Greedy generations four times longer than the window, with
chunked prefill (a 24-token budget), prefix caching, and a cache small enough to preempt (recompute
and swap), give HF transformers' tokens in float32; the block manager's integrity check holds after
every step; and the KV memory in use (blocks x the layers a block spans) stays well below what a
full-attention cache would hold for the same sequences at the same moment.
"""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_engine_vs_hf import hf_greedy
from tests.models.family_helpers import checkpoint_factory, load_hf_reference, tokenizer_ids

WINDOW, BLOCK, MAX_TOKENS = 16, 4, 64
PROMPTS = ["The quick brown fox jumps over the lazy dog and keeps running far away",
           "Hello, my name is", "One two three four five six seven"]
COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, rms_norm_eps=1e-6, sliding_window=WINDOW)


def config_for(version: str, tiny_dir):
    from transformers import Gemma2Config, Gemma3TextConfig

    ids = tokenizer_ids(tiny_dir)
    if version == "qwen2":  # use_sliding_window: layers from max_window_layers on are sliding
        from transformers import Qwen2Config

        return Qwen2Config(**{k: v for k, v in COMMON.items() if k != "head_dim"}, **ids,
                           num_hidden_layers=4, use_sliding_window=True, max_window_layers=2,
                           architectures=["Qwen2ForCausalLM"])
    if version == "gemma2":
        return Gemma2Config(**COMMON, **ids, num_hidden_layers=4, query_pre_attn_scalar=16,
                            attn_logit_softcapping=20.0, final_logit_softcapping=30.0,
                            architectures=["Gemma2ForCausalLM"])
    return Gemma3TextConfig(**COMMON, **ids, num_hidden_layers=6, query_pre_attn_scalar=16,
                            layer_types=["sliding_attention"] * 5 + ["full_attention"],
                            architectures=["Gemma3ForCausalLM"])


@pytest.fixture(scope="module")
def gemma_dir(tiny_model_dir, tmp_path_factory):
    gemma = checkpoint_factory(tiny_model_dir, tmp_path_factory, config_for, norm_center=0.0)
    qwen2 = checkpoint_factory(tiny_model_dir, tmp_path_factory, config_for)  # norm gains about 1
    return lambda version: qwen2(version) if version == "qwen2" else gemma(version)


@pytest.fixture(scope="module")
def hf_tokens(gemma_dir):
    """HF's greedy continuations of PROMPTS, per version (computed once)."""
    from transformers import AutoTokenizer

    cache = {}

    def get(version: str) -> list[list[int]]:
        if version not in cache:
            path = gemma_dir(version)
            tok = AutoTokenizer.from_pretrained(str(path))
            hf = load_hf_reference(path)
            cache[version] = [hf_greedy(hf, tok(p).input_ids, MAX_TOKENS)[0] for p in PROMPTS]
        return cache[version]

    return get


def run(path, num_blocks: int, mode: str = "recompute", **parallel):
    """Generates PROMPTS (then PROMPTS[0] again: a prefix-cache hit); returns (outputs, engine, peak
    layer-blocks in use, peak layer-blocks a full-attention cache would hold at the same steps)."""
    from vllm_engine import Engine, SamplingParams

    engine = Engine(model=str(path), dtype="float32", block_size=BLOCK, max_model_len=256, max_num_batched_tokens=24,
                    max_num_seqs=8, num_gpu_blocks_override=num_blocks, seed=0, enable_prefix_caching=True,
                    preemption_mode=mode, swap_space=0.01, async_scheduling=False, **parallel)
    groups = engine.config.cache.kv_cache_groups
    group_size = len(groups[0].layer_ids)
    num_layers = engine.config.model.num_layers
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), engine.tokenize(p), params)
    outs, peak_used, peak_full = {}, 0, 0
    sched = engine.scheduler
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
        sched.check_integrity()
        kv = sched.kv_cache_manager
        used = (sched.num_gpu_blocks - kv.num_free_blocks) * group_size
        full = sum(kv.num_table_entries(r) for r in sched.running) * num_layers
        peak_used, peak_full = max(peak_used, used), max(peak_full, full)
    again = engine.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    outs["again"], outs["again_cached"] = again.outputs[0].token_ids, again.num_cached_tokens
    sched.check_integrity()
    assert sched.kv_cache_manager.num_free_blocks == sched.num_gpu_blocks
    return outs, engine, peak_used, peak_full


@pytest.mark.parametrize("version, num_groups, max_ratio", [("gemma2", 2, 0.75), ("gemma3", 6, 0.45),
                                                          ("qwen2", 2, 0.75)])
def test_long_generations_match_hf_with_window_blocks_freed(version, num_groups, max_ratio, gemma_dir, hf_tokens):
    outs, engine, peak_used, peak_full = run(gemma_dir(version), num_blocks=512)
    assert len(engine.config.cache.kv_cache_groups) == num_groups
    want = hf_tokens(version)
    for i in range(len(PROMPTS)):
        assert outs[str(i)] == want[i], i
    assert outs["again"] == want[0] and outs["again_cached"] > 0  # a prefix-cache hit in every group
    print(f"{version}: peak KV in use {peak_used} layer-blocks, full attention {peak_full} "
          f"({peak_used / peak_full:.2f})")
    assert peak_used < max_ratio * peak_full


@pytest.mark.parametrize("version, num_blocks", [("gemma2", 40), ("gemma3", 90)])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_generations_match_hf(version, num_blocks, mode, gemma_dir, hf_tokens):
    """Too few blocks for the three requests at once: some are preempted (recomputed or swapped out
    and back, every group's blocks), and the tokens still equal HF's."""
    outs, engine, _, _ = run(gemma_dir(version), num_blocks=num_blocks, mode=mode)
    stats = engine.get_stats()
    assert stats.num_preemptions_total > 0
    if mode == "swap":
        assert stats.num_swaps_total > 0
    want = hf_tokens(version)
    for i in range(len(PROMPTS)):
        assert outs[str(i)] == want[i], i
    assert outs["again"] == want[0]


@pytest.mark.parametrize("version, parallel", [("gemma2", dict(pipeline_parallel_size=2)),
                                               ("gemma3", dict(tensor_parallel_size=2))])
def test_parallel_ranks_match_hf(version, parallel, gemma_dir, hf_tokens):
    """Two ranks (one process each): Gemma 2 split in two pipeline stages (each stage's layers use
    their own group positions' tensors), Gemma 3 over two tensor-parallel ranks."""
    outs, engine, _, _ = run(gemma_dir(version), num_blocks=90, **parallel)
    try:
        want = hf_tokens(version)
        for i in range(len(PROMPTS)):
            assert outs[str(i)] == want[i], i
        assert outs["again"] == want[0]
    finally:
        engine.shutdown()
