"""Mixtral, Qwen2-MoE and Qwen3-MoE against HF transformers on tiny random checkpoints (float32, CPU).

Mixtral: top-2 of 8 experts, renormalized. Qwen2-MoE: top-2 of 6 without renormalization, a gated
shared expert, q/k/v bias, a dense layer (mlp_only_layers). Qwen3-MoE: top-3 of 8 with
norm_topk_prob, q/k norm, head_dim. Router weights are scaled up so that tokens spread over experts
and the choice matters.
"""

from __future__ import annotations

import pytest
import torch

from tests.models.family_helpers import checkpoint_factory, engine_greedy_matches_hf, paged_logits_match_hf, \
    parallel_matches_one_rank_and_hf, spread_the_router, tokenizer_ids

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              max_position_embeddings=256, rms_norm_eps=1e-6)


def moe_config(family: str, tiny_dir):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    ids = tokenizer_ids(tiny_dir)
    if family == "mixtral":
        return MixtralConfig(**COMMON, **ids, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                             architectures=["MixtralForCausalLM"])
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**COMMON, **ids, intermediate_size=80, moe_intermediate_size=32,
                              shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                              norm_topk_prob=False, mlp_only_layers=[1], qkv_bias=True,
                              architectures=["Qwen2MoeForCausalLM"])
    return Qwen3MoeConfig(**COMMON, **ids, head_dim=24, intermediate_size=80, moe_intermediate_size=32,
                          num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, tie_word_embeddings=True,
                          architectures=["Qwen3MoeForCausalLM"])


@pytest.fixture(scope="module")
def moe_dir(tiny_model_dir, tmp_path_factory):
    return checkpoint_factory(tiny_model_dir, tmp_path_factory, moe_config, spread_the_router)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_paged_logits_match_hf(family, moe_dir, paged_vs_hf):
    paged_logits_match_hf(moe_dir(family), paged_vs_hf)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_engine_greedy_matches_hf(family, moe_dir):
    stats = engine_greedy_matches_hf(moe_dir(family))
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0


def test_tp2_matches_one_rank_and_hf(moe_dir, tmp_path):
    """Every expert's intermediate size split over two gloo ranks (and Qwen2-MoE's shared expert and
    dense layer): one all-reduce per block gives the one-rank logits. Dummy weights: each rank draws
    its slices of the one-rank experts."""
    jobs = [(f, str(moe_dir(f)), "auto") for f in ("mixtral", "qwen2_moe")]
    jobs.append(("dummy", str(moe_dir("qwen3_moe")), "dummy"))
    parallel_matches_one_rank_and_hf(tmp_path, jobs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
def test_the_triton_experts_through_the_interpreter_match_hf(moe_dir, paged_vs_hf, monkeypatch):
    """The model with its experts on the Triton kernel (as on a GPU), under the interpreter."""
    from vllm_engine.layers import fused_moe

    experts_hit = set()

    def triton_experts(x, w13, w2, weights, ids):
        experts_hit.update(ids.flatten().tolist())
        return fused_moe.triton_fused_moe(x, w13, w2, weights, ids)

    monkeypatch.setattr(fused_moe, "fused_moe", triton_experts)
    from tests.models.family_helpers import load_ours_and_hf

    model, cfg, hf = load_ours_and_hf(moe_dir("qwen3_moe"))
    paged_vs_hf(model, cfg, hf, [15, 10, 4], [[8, 0, 3], [6, 9, 1], [1, 1, 0]], tol=2e-4)
    assert len(experts_hit) >= 6  # of 8: the routing spreads


def test_missing_expert_tensors_are_named(moe_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = moe_dir("mixtral")
    dst = tmp_path / "missing"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, str(dst / "model.safetensors"))
    from tests.models.family_helpers import load_ours_and_hf

    with pytest.raises(ValueError, match="model.layers.1.block_sparse_moe.experts.5.w3.weight"):
        load_ours_and_hf(dst)
