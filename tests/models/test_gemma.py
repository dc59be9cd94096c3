"""Gemma 1, 2 and 3 (text) against HF transformers on tiny random checkpoints (float32, CPU).

Gemma: GeGLU (tanh GELU), (1 + w) RMSNorm, sqrt(hidden) embedding scale, tied head. Gemma 2: soft caps
on attention scores and final logits (set low so that they bite), alternating sliding-window (8) and
full layers, sandwich norms, query_pre_attn_scalar. Gemma 3: q/k norms, a local and a global rope
(the global one with linear scaling), a layer_types pattern. Sequences run past the window.
"""

from __future__ import annotations

import pytest
import torch

from tests.models.family_helpers import checkpoint_factory, engine_greedy_matches_hf, load_hf_reference, \
    paged_logits_match_hf, parallel_matches_one_rank_and_hf, tiny_checkpoint, tokenizer_ids

COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
              max_position_embeddings=512, rms_norm_eps=1e-6)

# Gemma 2/3's three layers (sliding, full, sliding) form three KV cache groups of one layer: a block
# spans one layer, so the memory of engine_greedy_matches_hf's 14 blocks of three layers is 42 blocks.
GROUPED_BLOCKS = 42


def gemma_config(version: str, tiny_dir):
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

    ids = tokenizer_ids(tiny_dir)
    if version == "gemma":
        return GemmaConfig(**COMMON, **ids, num_hidden_layers=2, architectures=["GemmaForCausalLM"])
    if version == "gemma2":
        return Gemma2Config(**COMMON, **ids, num_hidden_layers=3, query_pre_attn_scalar=20, sliding_window=8,
                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                            architectures=["Gemma2ForCausalLM"])
    return Gemma3TextConfig(**COMMON, **ids, num_hidden_layers=3, query_pre_attn_scalar=32, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                "rope_theta": 100_000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}},
                            architectures=["Gemma3ForCausalLM"])


@pytest.fixture(scope="module")
def gemma_dir(tiny_model_dir, tmp_path_factory):
    return checkpoint_factory(tiny_model_dir, tmp_path_factory, gemma_config, norm_center=0.0)


@pytest.mark.parametrize("version", ["gemma", "gemma2", "gemma3"])
def test_paged_logits_match_hf(version, gemma_dir, paged_vs_hf):
    paged_logits_match_hf(gemma_dir(version), paged_vs_hf)


@pytest.mark.parametrize("version", ["gemma", "gemma2", "gemma3"])
def test_engine_greedy_matches_hf(version, gemma_dir):
    stats = engine_greedy_matches_hf(gemma_dir(version), num_gpu_blocks=14 if version == "gemma" else GROUPED_BLOCKS)
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0


def test_the_soft_caps_and_window_change_the_logits(gemma_dir):
    """The Gemma 2 checkpoint's caps and window matter (so the test above can fail): without them
    HF's own logits move."""
    path = gemma_dir("gemma2")
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(0))
    hf = load_hf_reference(path)
    with torch.no_grad():
        base = hf(ids).logits
        for field in ("attn_logit_softcapping", "sliding_window"):
            kw = {field: 10_000 if field == "sliding_window" else None}
            changed = load_hf_reference(path, **kw)
            assert (changed(ids).logits - base).abs().max() > 1e-2, field
    assert base.abs().max() <= 3.0  # the final cap


def test_unsupported_settings_are_refused(gemma_dir):
    from vllm_engine.attention.torch_ref import TorchAttentionBackend
    from vllm_engine.models.gemma import GemmaForCausalLM

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(gemma_dir("gemma2")))
    cfg.hidden_activation = "relu"
    with pytest.raises(ValueError, match="hidden_activation 'relu'"):
        GemmaForCausalLM(cfg, TorchAttentionBackend())
    cfg = AutoConfig.from_pretrained(str(gemma_dir("gemma3")))
    cfg.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        GemmaForCausalLM(cfg, TorchAttentionBackend())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.parametrize("version", ["gemma2", "gemma3"])
def test_the_gpu_path_through_the_interpreter_matches_hf(version, gemma_dir, paged_vs_hf, monkeypatch):
    """The kernels a GPU runs (fused (1 + w) norms and q/k norms with the rotary pass, the soft-capped,
    windowed Triton attention, our GEMV/GEMM with the norm folded in) under the Triton interpreter."""
    from tests.kernels.test_triton_model import InterpretedTritonConfig, LongestFirst
    from vllm_engine.config import EngineArgs
    from vllm_engine.layers import fused_ops
    from vllm_engine.models.gemma import GemmaForCausalLM

    monkeypatch.setattr(fused_ops, "_use_triton", lambda x: True)
    path = gemma_dir(version)
    cfg = EngineArgs(model=str(path), dtype="float32", device="cpu", max_model_len=256).create_engine_config().model
    hf = load_hf_reference(path)
    model = GemmaForCausalLM(cfg.hf_config, LongestFirst(prefill_block_m=16, tile_n=16), max_position=256,
                             dtype=torch.float32, quant_config=InterpretedTritonConfig())
    model.load_weights(iter(_checkpoint(path)))
    paged_vs_hf(model.eval(), cfg, hf, [15, 10, 4], [[8, 0, 3], [6, 9, 1], [1, 1, 0]], tol=2e-3)


def _checkpoint(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors")).items()


def test_tp2_matches_one_rank_and_hf(gemma_dir, tmp_path):
    """Gemma 2 and 3 split over two gloo ranks (one KV head each; soft caps, windows, q/k norms)."""
    jobs = [(v, str(gemma_dir(v)), "auto") for v in ("gemma2", "gemma3")]
    parallel_matches_one_rank_and_hf(tmp_path, jobs)


@pytest.fixture(scope="module")
def gemma3_multimodal_dir(tiny_model_dir, tmp_path_factory):
    """A tiny Gemma3ForConditionalGeneration checkpoint (a one-layer vision tower beside the text model)."""
    from transformers import Gemma3Config, SiglipVisionConfig

    tiny = tiny_model_dir("llama")
    text = gemma_config("gemma3", tiny)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          boi_token_index=300, eoi_token_index=301, image_token_index=302,
                          architectures=["Gemma3ForConditionalGeneration"])
    return tiny_checkpoint(config, tmp_path_factory.mktemp("gemma3mm"), tiny, norm_center=0.0)


def test_multimodal_gemma3_checkpoint_is_served_text_only(gemma3_multimodal_dir, paged_vs_hf):
    """Its text_config becomes the model config; the language model's weights load (vision skipped) and
    give HF's text-only logits; the whole engine gives HF's greedy tokens."""
    from tests.models.family_helpers import load_ours_and_hf

    model, cfg, hf = load_ours_and_hf(gemma3_multimodal_dir)
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    assert cfg.hf_config.model_type == "gemma3_text" and cfg.architecture == "Gemma3ForConditionalGeneration"
    paged_vs_hf(model, cfg, hf, [21, 9, 4], [[12, 0, 4], [8, 9, 0], [1, 0, 0]], tol=1e-4)
    engine_greedy_matches_hf(gemma3_multimodal_dir, num_gpu_blocks=GROUPED_BLOCKS)
