"""Phi-3 / Phi-3.5 against HF transformers on tiny random checkpoints (float32, CPU): fused qkv and
gate_up tensors in the checkpoint, LongRoPE (Phi-3.5: short/long factors, attention factor), and a
Phi-4-mini-like variant (partial rotary, tied head) with a sliding window."""

from __future__ import annotations

import pytest
import torch

from tests.models.family_helpers import checkpoint_factory, engine_greedy_matches_hf, paged_logits_match_hf, \
    parallel_matches_one_rank_and_hf, tokenizer_ids

HEAD_DIM = 16
ORIGINAL_MAX = 64  # every test sequence is shorter: HF then uses the short factors throughout


def _factors(seed: int, n: int) -> list[float]:
    return (1.0 + 3.0 * torch.rand(n, generator=torch.Generator().manual_seed(seed))).tolist()


def phi3_config(variant: str, tiny_dir):
    from transformers import Phi3Config

    common = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, rms_norm_eps=1e-5, architectures=["Phi3ForCausalLM"], **tokenizer_ids(tiny_dir))
    if variant == "longrope":
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _factors(1, HEAD_DIM // 2),
                "long_factor": _factors(2, HEAD_DIM // 2), "original_max_position_embeddings": ORIGINAL_MAX}
        return Phi3Config(**common, max_position_embeddings=512, original_max_position_embeddings=ORIGINAL_MAX,
                          rope_parameters=rope)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    return Phi3Config(**common, max_position_embeddings=512, rope_parameters=rope, tie_word_embeddings=True,
                      sliding_window=8)


@pytest.fixture(scope="module")
def phi3_dir(tiny_model_dir, tmp_path_factory):
    return checkpoint_factory(tiny_model_dir, tmp_path_factory, phi3_config)


@pytest.mark.parametrize("variant", ["longrope", "partial"])
def test_paged_logits_match_hf(variant, phi3_dir, paged_vs_hf):
    paged_logits_match_hf(phi3_dir(variant), paged_vs_hf)


def test_engine_greedy_matches_hf(phi3_dir):
    stats = engine_greedy_matches_hf(phi3_dir("longrope"))
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0


def test_longrope_table_short_then_long_factors_with_the_attention_factor(phi3_dir):
    """Rows below original_max are HF's short-factor rotation, rows from there on its long-factor
    one (HF's frequencies for a sequence past the original context), both times HF's attention factor."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from vllm_engine.layers.rotary import LongRoPERotaryEmbedding, get_rope

    config = AutoConfig.from_pretrained(str(phi3_dir("longrope")))
    rope = get_rope(config, HEAD_DIM, 128)
    assert isinstance(rope, LongRoPERotaryEmbedding)
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    long, factor_long = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=ORIGINAL_MAX + 1)
    assert factor == factor_long and factor > 1.0
    assert not torch.allclose(short, long)
    t = torch.arange(128, dtype=torch.float32)[:, None]
    freqs = torch.where(t < ORIGINAL_MAX, t * short, t * long)
    want = torch.cat((freqs.cos() * factor, freqs.sin() * factor), dim=-1)
    torch.testing.assert_close(rope.cos_sin_cache, want, atol=1e-6, rtol=1e-6)


def test_fused_tensors_of_the_wrong_size_are_refused(phi3_dir):
    from vllm_engine.models.phi3 import split_fused_tensors
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(phi3_dir("longrope")))
    bad = [("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(100, 64))]
    with pytest.raises(ValueError, match="qkv_proj.weight has 100 rows, expected 128"):
        list(split_fused_tensors(bad, config))


def test_tp2_matches_one_rank_and_hf(phi3_dir, tmp_path):
    """Each rank's heads and MLP columns cut from the fused checkpoint tensors."""
    jobs = [(v, str(phi3_dir(v)), "auto") for v in ("longrope", "partial")]
    parallel_matches_one_rank_and_hf(tmp_path, jobs)


def test_the_partial_variant_rotates_half_of_each_head_in_a_window(phi3_dir):
    from tests.models.family_helpers import load_ours_and_hf

    model, _, _ = load_ours_and_hf(phi3_dir("partial"))
    attn = model.model.layers[0].self_attn.attn
    assert attn.rotary_emb.rotary_dim == HEAD_DIM // 2 and attn.sliding_window == 8
    assert model.lm_head is model.model.embed_tokens
