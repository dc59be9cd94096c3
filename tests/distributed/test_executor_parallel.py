"""The engine over several worker processes (``MultiprocExecutor``, gloo on the CPU): greedy tokens
and their logprobs equal HF transformers' and the one-rank engine's, at tp=2 on each tiny family,
pp=2, and tp=2 x pp=2; seeded sampling, chunked prefill, prefix caching, preemption with swap and
async scheduling give the one-rank engine's tokens too (at pp=2 with two micro-batches in flight).
"""

from __future__ import annotations

import pytest
import torch

from distributed.executor_helpers import ENGINE_KWARGS, MAX_TOKENS, PROMPTS, hf_greedy
from vllm_engine import Engine, SamplingParams


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    """Per arch: (checkpoint, prompt ids, HF greedy references, the one-rank engine's outputs)."""
    from transformers import AutoModelForCausalLM

    built = {}

    def get(arch: str):
        if arch not in built:
            path = tiny_model_dir(arch)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
            single = Engine(model=str(path), **ENGINE_KWARGS)
            prompt_ids = [single.tokenize(p) for p in PROMPTS]
            outs = single.generate(PROMPTS, _greedy(logprobs=2, prompt_logprobs=1), use_tqdm=False)
            built[arch] = (path, prompt_ids, [hf_greedy(hf, ids, MAX_TOKENS) for ids in prompt_ids], outs)
        return built[arch]

    return get


def _check_against(outs, prompt_ids, hf_refs, single_outs) -> None:
    for out, ids, (tokens, lps, prompt_lps), one in zip(outs, prompt_ids, hf_refs, single_outs):
        assert out.prompt_token_ids == ids
        assert out.token_ids == tokens == one.token_ids
        got = [d[t].logprob for d, t in zip(out.outputs[0].logprobs, tokens)]
        assert got == pytest.approx(lps, abs=1e-4)
        # The top-2 alternatives and their logprobs are the one-rank engine's.
        for mine, ref in zip(out.outputs[0].logprobs, one.outputs[0].logprobs):
            assert list(mine) == list(ref)
            assert [v.logprob for v in mine.values()] == pytest.approx([v.logprob for v in ref.values()], abs=1e-5)
        got_prompt = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
        assert got_prompt == pytest.approx(prompt_lps, abs=1e-4)


@pytest.mark.parametrize("arch,tp,pp", [
    ("llama", 2, 1), ("qwen2", 2, 1), ("qwen3", 2, 1), ("mistral", 2, 1),
    ("qwen3", 1, 2),  # tied embeddings: the last stage holds its own copy as the LM head
    ("llama", 2, 2),
])
def test_greedy_tokens_and_logprobs_match_hf_and_one_rank(references, arch, tp, pp):
    path, prompt_ids, hf_refs, single_outs = references(arch)
    engine = Engine(model=str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE_KWARGS)
    try:
        assert engine.config.parallel.distributed_executor_backend == "mp"
        assert len(engine.executor.procs) == tp * pp and engine.model_runner is None
        outs = engine.generate(PROMPTS, _greedy(logprobs=2, prompt_logprobs=1), use_tqdm=False)
        _check_against(outs, prompt_ids, hf_refs, single_outs)
        engine.scheduler.check_integrity()
    finally:
        engine.shutdown()


# A budget of 16 tokens chunks every prompt; 12 blocks of 4 tokens cannot hold four requests at once
# (preemption, here by swapping out); the shared prefix hits the prefix cache; the seeded samples must
# be drawn the same on every rank.
STRESS_KWARGS = dict(dtype="float32", max_model_len=128, num_gpu_blocks_override=12, block_size=4,
                     max_num_batched_tokens=16, max_num_seqs=4, preemption_mode="swap", swap_space=0.01,
                     enable_prefix_caching=True, async_scheduling=True, seed=0)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_chunking_prefix_cache_swap_async_and_seeded_sampling_match_one_rank(tiny_model_dir, tp, pp):
    path = tiny_model_dir("llama")
    shared = "The quick brown fox jumps over the lazy dog. "
    prompts = [shared + "Hello", shared + "The capital", "In the beginning", shared + "A paged"]
    params = [_greedy(), _greedy(), SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=MAX_TOKENS,
                                                   ignore_eos=True), _greedy()]
    single = Engine(model=str(path), **STRESS_KWARGS)
    ref = single.generate(prompts, params, use_tqdm=False)
    engine = Engine(model=str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, **STRESS_KWARGS)
    try:
        profile = engine.enable_step_profile()
        outs = engine.generate(prompts, params, use_tqdm=False)
        stats = engine.get_stats()
        engine.scheduler.check_integrity()
    finally:
        engine.shutdown()
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[c.token_ids for c in o.outputs] for o in ref]
    assert all(t >= 0 for o in outs for c in o.outputs for t in c.token_ids)  # no placeholder left
    assert stats.num_swaps_total > 0 and stats.prefix_cache_hits > 0  # the regimes did happen
    if pp == 1:
        assert stats.num_swaps_total == single.get_stats().num_swaps_total
    else:  # micro-batches: a step was launched while the one before was in flight
        assert max(r["in_flight"] for r in profile) == pp


def test_kv_blocks_are_the_minimum_over_ranks(tiny_model_dir, tmp_path):
    """Each rank sizes the cache from its own share of it; the engine takes the smallest count. With 3
    layers over 2 stages, stage 0 (2 layers) fits half the blocks stage 1 (1 layer) fits; at tp=2 a
    rank caches half the KV heads. Dummy weights: every layout holds the same model, same tokens."""
    import json
    import shutil

    path = tmp_path / "three-layers"
    shutil.copytree(tiny_model_dir("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    space_gib = 0.001
    kw = dict(load_format="dummy", dtype="float32", max_model_len=256, max_num_seqs=4096,
              cpu_kv_cache_space=space_gib, seed=0)
    head_bytes = 2 * 16 * config["head_dim"] * 4  # K and V of one head of one layer: 16 tokens, float32

    def blocks(layers: int, kv_heads: int) -> int:
        return int(space_gib * 2**30) // (head_bytes * layers * kv_heads)

    one = Engine(model=str(path), **kw)
    assert one.num_gpu_blocks == blocks(3, 2)
    ids = [1, 5, 9, 23, 44, 7]
    ref = one.generate(ids, _greedy(), use_tqdm=False).token_ids
    for tp, pp, want in [(1, 2, blocks(2, 2)), (2, 1, blocks(3, 1))]:
        engine = Engine(model=str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, **kw)
        try:
            assert engine.num_gpu_blocks == want
            assert engine.generate(ids, _greedy(), use_tqdm=False).token_ids == ref
        finally:
            engine.shutdown()


def test_smollm2_gguf_at_tp3_matches_one_rank(smollm2_gguf):
    """The real SmolLM2-135M (Q4_1 GGUF, dequantized at load): 9 query heads and 3 KV heads over 3
    ranks, one KV head each; the vocabulary (49152) split three ways in the embedding and LM head."""
    kw = dict(dtype="float32", max_model_len=128, num_gpu_blocks_override=64, seed=0)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = _greedy(logprobs=2)
    ref = Engine(model=str(smollm2_gguf), **kw).generate(prompts, params, use_tqdm=False)
    engine = Engine(model=str(smollm2_gguf), tensor_parallel_size=3, **kw)
    try:
        outs = engine.generate(prompts, params, use_tqdm=False)
    finally:
        engine.shutdown()
    for out, one in zip(outs, ref):
        assert out.token_ids == one.token_ids
        for mine, theirs in zip(out.outputs[0].logprobs, one.outputs[0].logprobs):
            assert list(mine) == list(theirs)
            assert [v.logprob for v in mine.values()] == pytest.approx([v.logprob for v in theirs.values()], abs=1e-3)
