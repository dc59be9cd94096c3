"""YaRN rope scaling (Qwen2.5's long-context configs, DeepSeek) on the Llama-family model against HF
transformers: the ramp-blended frequencies and the attention factor on cos and sin."""

from __future__ import annotations

import pytest

from tests.models.family_helpers import paged_logits_match_hf, tiny_checkpoint, tokenizer_ids


@pytest.mark.parametrize("extra", [{}, {"beta_fast": 8, "beta_slow": 2}])
def test_qwen2_with_yarn_matches_hf(extra, tiny_model_dir, tmp_path, paged_vs_hf):
    from transformers import Qwen2Config

    tiny = tiny_model_dir("llama")
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            **extra}
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, rope_parameters=rope,
                         architectures=["Qwen2ForCausalLM"], **tokenizer_ids(tiny))
    paged_logits_match_hf(tiny_checkpoint(config, tmp_path / "qwen2-yarn", tiny), paged_vs_hf)
