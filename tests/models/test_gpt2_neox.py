"""GPT-2, GPT-BigCode and GPT-NeoX / Pythia against HF transformers on tiny random checkpoints
(float32, CPU). GPT-BigCode: multi-query (one KV head, replicated at tp=2) and multi-head c_attn.

GPT-2: learned positions, LayerNorm with biases, gelu_new, Conv1D weights (transposed on loading),
fused c_attn, tied head, and the per-layer score scale 1 / (layer + 1) of
``scale_attn_by_inverse_layer_idx``. GPT-NeoX: interleaved query_key_value, partial rotary (a
quarter and a half of each head), parallel and sequential residuals, untied ``embed_out`` head.
"""

from __future__ import annotations

import pytest
import torch

from tests.models.family_helpers import checkpoint_factory, engine_greedy_matches_hf, paged_logits_match_hf, \
    parallel_matches_one_rank_and_hf, tokenizer_ids


def family_config(variant: str, tiny_dir):
    from transformers import GPT2Config, GPTBigCodeConfig, GPTNeoXConfig

    ids = tokenizer_ids(tiny_dir)
    if variant.startswith("bigcode"):
        return GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=256, multi_query=variant == "bigcode",
                                architectures=["GPTBigCodeForCausalLM"], **ids)
    if variant == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, activation_function="gelu_new",
                          scale_attn_by_inverse_layer_idx=True, architectures=["GPT2LMHeadModel"], **ids)
    parallel = variant == "neox"
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25 if parallel else 0.5}
    return GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=256, use_parallel_residual=parallel, rope_parameters=rope,
                         hidden_act="gelu", architectures=["GPTNeoXForCausalLM"], **ids)


@pytest.fixture(scope="module")
def family_dir(tiny_model_dir, tmp_path_factory):
    return checkpoint_factory(tiny_model_dir, tmp_path_factory, family_config)


@pytest.mark.parametrize("variant", ["gpt2", "neox", "neox_sequential", "bigcode", "bigcode_mha"])
def test_paged_logits_match_hf(variant, family_dir, paged_vs_hf):
    paged_logits_match_hf(family_dir(variant), paged_vs_hf)


@pytest.mark.parametrize("variant", ["gpt2", "neox"])
def test_engine_greedy_matches_hf(variant, family_dir):
    """GPT-2 (no rotary: the backend writes K/V) and GPT-NeoX (partial rotary, parallel residual)
    through the whole engine."""
    stats = engine_greedy_matches_hf(family_dir(variant))
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0


def test_tp2_matches_one_rank_and_hf(family_dir, tmp_path):
    """Heads cut from GPT-2's transposed c_attn, NeoX's interleaved query_key_value and BigCode's
    multi-query c_attn; biases of the row-parallel projections added once."""
    jobs = [(v, str(family_dir(v)), "auto") for v in ("gpt2", "neox", "bigcode")]
    parallel_matches_one_rank_and_hf(tmp_path, jobs)


def test_pythia_checkpoint_names_load(family_dir, tmp_path):
    """A Pythia checkpoint as published (``embed_out`` head, the old mask buffers, rotary inv_freq)
    loads to the same model as the transformers-5 names."""
    from safetensors.torch import load_file, save_file

    from tests.models.family_helpers import load_ours_and_hf

    src = family_dir("neox")
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in tensors.items()}
    for i in range(2):
        renamed[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        renamed[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        renamed[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    dst = tmp_path / "pythia-names"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(renamed, str(dst / "model.safetensors"))
    ours, _, _ = load_ours_and_hf(dst)
    want, _, _ = load_ours_and_hf(src)
    for (name, p), (_, q) in zip(ours.named_parameters(), want.named_parameters()):
        assert torch.equal(p, q), name


def test_unsupported_activation_is_refused(family_dir):
    from transformers import AutoConfig

    from vllm_engine.attention.torch_ref import TorchAttentionBackend
    from vllm_engine.models.gpt2 import GPT2LMHeadModel

    cfg = AutoConfig.from_pretrained(str(family_dir("gpt2")))
    cfg.activation_function = "mish"
    with pytest.raises(ValueError, match="activation_function 'mish'"):
        GPT2LMHeadModel(cfg, TorchAttentionBackend())
