"""Two pipeline stages (gloo processes, hidden states and residuals sent stage to stage) for a family
of each new layer kind (sandwich norms, LayerNorm and learned positions, parallel residual, latent
attention, experts): the logits and greedy tokens of one process and of HF transformers."""

from __future__ import annotations

from tests.models.family_helpers import parallel_matches_one_rank_and_hf, tiny_checkpoint
from tests.models.test_families_gpu import tiny_family_config


def test_pp2_matches_one_stage_and_hf(tiny_model_dir, tmp_path):
    families = ("gemma", "gpt2", "neox", "deepseek_v2", "qwen2_moe")  # 2 layers each: one per stage
    tiny = tiny_model_dir("llama")
    jobs = []
    for family in families:
        config, center = tiny_family_config(family, tiny)
        jobs.append((family, str(tiny_checkpoint(config, tmp_path / family, tiny, norm_center=center)), "auto"))
    parallel_matches_one_rank_and_hf(tmp_path, jobs, tp=1, pp=2)
