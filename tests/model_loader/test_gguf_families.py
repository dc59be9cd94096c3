"""GGUF files of the families after Llama, against HF transformers on the same weights (float32, CPU).

Each tiny HF checkpoint (transformers' own config classes, ``save_pretrained``) is written as a GGUF
the way llama.cpp's converter lays it out (tests/model_loader/gguf_from_hf.py: the ``gguf`` package's
tensor names and metadata writers), in F32, F16 or Q8_0. HF runs a copy of the checkpoint whose
weights that type holds exactly, so the only difference left is the loading: our model built from
the GGUF alone (config from its metadata, tensors renamed and the converter's changes undone) gives
HF's logits at every position of a paged, chunked batch, and the engine gives HF's greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.model_loader.gguf_from_hf import exact_checkpoint, write_gguf
from tests.models.family_helpers import LENS, SCHEDULE, tiny_checkpoint, tokenizer_ids

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              max_position_embeddings=256, rms_norm_eps=1e-6)


def family_config(variant: str, tiny_dir: Path):
    """(GGUF architecture, HF config) of each variant: shapes llama.cpp represents (e.g. Gemma 2's
    query_pre_attn_scalar = head_dim, Gemma 3's local rope base 10k, MoE layers everywhere)."""
    import transformers as tf

    ids = tokenizer_ids(tiny_dir)
    gemma = dict(COMMON, head_dim=16, intermediate_size=96, query_pre_attn_scalar=16, sliding_window=8)
    if variant == "gemma":
        return "gemma", tf.GemmaConfig(**{k: v for k, v in gemma.items() if k not in ("query_pre_attn_scalar",
                                                                                     "sliding_window")},
                                       **ids, architectures=["GemmaForCausalLM"])
    if variant == "gemma2":
        return "gemma2", tf.Gemma2Config(**{**gemma, "num_hidden_layers": 3}, **ids, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=3.0, architectures=["Gemma2ForCausalLM"])
    if variant == "gemma3":
        rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
        return "gemma3", tf.Gemma3TextConfig(**{**gemma, "num_hidden_layers": 7}, **ids, rope_parameters=rope,
                                             architectures=["Gemma3ForCausalLM"])
    if variant in ("phi3", "phi3-longrope"):
        if variant == "phi3":
            rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
            extra = dict(sliding_window=8)
        else:
            g = torch.Generator().manual_seed(1)
            factors = [(1.0 + 3.0 * torch.rand(8, generator=g)).tolist() for _ in range(2)]
            rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": factors[0],
                    "long_factor": factors[1], "original_max_position_embeddings": 64}
            extra = dict(original_max_position_embeddings=64)
        return "phi3", tf.Phi3Config(**{**COMMON, "max_position_embeddings": 512}, intermediate_size=96, **ids,
                                     rope_parameters=rope, architectures=["Phi3ForCausalLM"], **extra)
    if variant == "gpt2":
        return "gpt2", tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, activation_function="gelu_new",
                                     architectures=["GPT2LMHeadModel"], **ids)
    if variant == "gptneox":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
        return "gptneox", tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=256, rope_parameters=rope,
                                           hidden_act="gelu", tie_word_embeddings=False,
                                           architectures=["GPTNeoXForCausalLM"], **ids)
    if variant.startswith("deepseek"):
        from tests.models.test_deepseek import deepseek_config

        return "deepseek2", deepseek_config(variant.split("_")[1], tiny_dir)
    if variant == "mixtral":
        return "llama", tf.MixtralConfig(**COMMON, **ids, intermediate_size=64, num_local_experts=4,
                                         num_experts_per_tok=2, architectures=["MixtralForCausalLM"])
    if variant == "qwen2moe":
        return "qwen2moe", tf.Qwen2MoeConfig(**COMMON, **ids, intermediate_size=96, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                             norm_topk_prob=False, qkv_bias=True, architectures=["Qwen2MoeForCausalLM"])
    assert variant == "qwen3moe"
    return "qwen3moe", tf.Qwen3MoeConfig(**COMMON, **ids, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
                                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                         architectures=["Qwen3MoeForCausalLM"])


VARIANTS = ["gemma", "gemma2", "gemma3", "phi3", "phi3-longrope", "gpt2", "gptneox", "mixtral", "qwen2moe", "qwen3moe",
            "deepseek_v2", "deepseek_v3"]


@pytest.fixture(scope="module")
def gguf_pair(tiny_model_dir, tmp_path_factory):
    """``make(variant, qtype)`` -> (GGUF file, HF directory holding exactly the file's weights)."""
    from tests.models.family_helpers import spread_the_router

    built: dict = {}

    def make(variant: str, qtype: str) -> tuple[Path, Path]:
        if (variant, qtype) not in built:
            tiny = tiny_model_dir("llama")
            arch, config = family_config(variant, tiny)
            root = tmp_path_factory.mktemp(f"{variant}-{qtype}")
            hf_dir = tiny_checkpoint(config, root / "hf", tiny, norm_center=0.0 if "gemma" in variant else 1.0)
            if "moe" in variant or variant in ("mixtral", "deepseek_v2", "deepseek_v3"):
                spread_the_router(hf_dir)
            exact = exact_checkpoint(hf_dir, root / "exact", arch, qtype)
            built[(variant, qtype)] = (write_gguf(exact, root / f"model-{qtype}.gguf", arch, qtype), exact)
        return built[(variant, qtype)]

    return make


def load_from_gguf(gguf_file: Path, hf_dir: Path):
    """(our model from the GGUF alone, its ModelConfig, HF's model on ``hf_dir``)."""
    from transformers import AutoModelForCausalLM

    from vllm_engine.attention.torch_ref import TorchAttentionBackend
    from vllm_engine.config import EngineArgs
    from vllm_engine.model_loader import get_model

    cfg = EngineArgs(model=str(gguf_file), tokenizer=str(hf_dir), dtype="float32", device="cpu",
                     max_model_len=256).create_engine_config().model
    assert cfg.load_format == "gguf"
    model = get_model(cfg, torch.device("cpu"), TorchAttentionBackend())
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    return model, cfg, hf


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_logits_match_hf(variant, qtype, gguf_pair, paged_vs_hf):
    gguf_file, hf_dir = gguf_pair(variant, qtype)
    model, cfg, hf = load_from_gguf(gguf_file, hf_dir)
    assert cfg.architecture == hf.config.architectures[0]
    if variant.startswith("deepseek"):  # the cache holds one [latent | rope] vector per token and layer
        from types import SimpleNamespace

        hf_cfg = cfg.hf_config
        cfg = SimpleNamespace(num_kv_heads=1, head_dim=hf_cfg.kv_lora_rank + hf_cfg.qk_rope_head_dim,
                              num_layers=cfg.num_layers, vocab_size=cfg.vocab_size)
    paged_vs_hf(model, cfg, hf, LENS, SCHEDULE, tol=1e-4)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "phi3", "gpt2", "gptneox", "qwen3moe", "deepseek_v3"])
def test_gguf_engine_greedy_matches_hf(variant, gguf_pair):
    """The whole engine on an F16 GGUF (chunked prefill, prefix caching): HF's greedy tokens."""
    from tests.e2e.test_engine_vs_hf import hf_greedy
    from vllm_engine import Engine, SamplingParams

    gguf_file, hf_dir = gguf_pair(variant, "F16")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    engine = Engine(model=str(gguf_file), tokenizer=str(hf_dir), dtype="float32", max_model_len=128, seed=0,
                    block_size=4, max_num_batched_tokens=8, max_num_seqs=4, enable_prefix_caching=True)
    prompts = ["Hello, my name is", "The capital of France is a city that", "Hello, my name is"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = engine.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, engine.tokenize(prompt), 12)[0], prompt
    engine.scheduler.check_integrity()


def test_deepseek_file_of_the_older_layout_loads(gguf_pair, tmp_path, paged_vs_hf):
    """A deepseek2 file from before the absorbed-MLA layout: kv_b_proj whole (``attn_kv_b``), per-head
    key/value lengths, no ``*_mla`` keys."""
    from types import SimpleNamespace

    _, hf_dir = gguf_pair("deepseek_v2", "F32")
    path = write_gguf(hf_dir, tmp_path / "old.gguf", "deepseek2", "F32", absorbed=False)
    model, cfg, hf = load_from_gguf(path, hf_dir)
    h = cfg.hf_config
    cache = SimpleNamespace(num_kv_heads=1, head_dim=h.kv_lora_rank + h.qk_rope_head_dim, num_layers=cfg.num_layers,
                            vocab_size=cfg.vocab_size)
    paged_vs_hf(model, cache, hf, LENS, SCHEDULE, tol=1e-4)


def test_unmapped_architectures_are_refused_by_name(tmp_path):
    """GGUF architectures we do not map (StarCoder's, ...) are a ValueError naming them."""
    import gguf

    from vllm_engine.config import EngineArgs

    path = tmp_path / "starcoder.gguf"
    w = gguf.GGUFWriter(str(path), "starcoder")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="Unsupported GGUF architecture 'starcoder'.*deepseek2.*gemma2.*qwen3moe"):
        EngineArgs(model=str(path), dtype="float32", device="cpu").create_engine_config()


def test_kept_quantized_mode_refuses_other_architectures(gguf_pair):
    from vllm_engine.quantization.gguf import GGUFConfig

    gguf_file, _ = gguf_pair("gemma2", "Q8_0")
    with pytest.raises(ValueError, match="'gemma2'.*leave quantization unset"):
        GGUFConfig.from_gguf_file(str(gguf_file))
