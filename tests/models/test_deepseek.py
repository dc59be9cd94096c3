"""DeepSeek-V2 and V3 against HF transformers on tiny random checkpoints (float32, CPU).

V2 (V2-Lite's layout): no q LoRA, YaRN rope with mscale_all_dim (in the score scale), softmax routing
limited to the best groups, a shared expert, one dense first layer. V3: q LoRA, sigmoid routing with
the correction bias over groups, normalized top-k weights times routed_scaling_factor. Both: latent
attention absorbed into one [latent | rope] head per token in the paged cache.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.models.family_helpers import LENS, SCHEDULE, checkpoint_factory, engine_greedy_matches_hf, \
    load_hf_reference, load_ours_and_hf, parallel_matches_one_rank_and_hf, spread_the_router, tokenizer_ids

LATENT, ROPE = 32, 8


def deepseek_config(version: str, tiny_dir):
    from transformers import DeepseekV2Config, DeepseekV3Config

    common = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=LATENT, qk_nope_head_dim=16,
                  qk_rope_head_dim=ROPE, v_head_dim=12, n_group=4, topk_group=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, **tokenizer_ids(tiny_dir))
    if version == "v2":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
        return DeepseekV2Config(**common, q_lora_rank=None, topk_method="group_limited_greedy",
                                routed_scaling_factor=1.0, rope_parameters=rope, architectures=["DeepseekV2ForCausalLM"])
    return DeepseekV3Config(**common, q_lora_rank=24, norm_topk_prob=True, routed_scaling_factor=2.5,
                            architectures=["DeepseekV3ForCausalLM"])


@pytest.fixture(scope="module")
def deepseek_dir(tiny_model_dir, tmp_path_factory):
    return checkpoint_factory(tiny_model_dir, tmp_path_factory, deepseek_config, spread_the_router)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_paged_logits_match_hf(version, deepseek_dir, paged_vs_hf):
    model, cfg, hf = load_ours_and_hf(deepseek_dir(version))
    # The cache holds one [latent | rope] vector per token and layer (not the config's per-head K/V).
    cache_cfg = SimpleNamespace(num_kv_heads=1, head_dim=LATENT + ROPE, num_layers=cfg.num_layers,
                                vocab_size=cfg.vocab_size)
    paged_vs_hf(model, cache_cfg, hf, LENS, SCHEDULE, tol=1e-4)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_engine_greedy_matches_hf(version, deepseek_dir):
    stats = engine_greedy_matches_hf(deepseek_dir(version))
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0


def test_tp2_matches_one_rank_and_hf(deepseek_dir, tmp_path):
    """Heads (q, kv_b, o) split over two gloo ranks, the latent replicated; experts split like Mixtral's."""
    jobs = [(v, str(deepseek_dir(v)), "auto") for v in ("v2", "v3")]
    parallel_matches_one_rank_and_hf(tmp_path, jobs)


def test_grouped_routing_matches_hf_routers(deepseek_dir):
    """Our routing (float32 router, grouped top-k, bias, scaling) picks HF's experts with HF's weights."""
    for version in ("v2", "v3"):
        path = deepseek_dir(version)
        hf = load_hf_reference(path)
        ours, _, _ = load_ours_and_hf(path)
        x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, hf_w, hf_ids = hf.model.layers[1].mlp.gate(x)
            w, ids = ours.model.layers[1].mlp.route(x)
        order, hf_order = ids.sort(-1), hf_ids.sort(-1)
        assert torch.equal(order.values, hf_order.values)
        torch.testing.assert_close(w.gather(1, order.indices), hf_w.gather(1, hf_order.indices))


def test_yarn_table_matches_hf():
    """YaRN inverse frequencies and attention factor (with DeepSeek's mscale pair, and without)."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from vllm_engine.layers.rotary import get_rope

    for extra in ({}, {"mscale": 1.0, "mscale_all_dim": 0.5}, {"beta_fast": 16, "truncate": False}):
        rope = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
                **extra}
        config = Qwen2Config(hidden_size=64, num_attention_heads=2, max_position_embeddings=512, rope_parameters=rope)
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
        freqs = torch.arange(100, dtype=torch.float32)[:, None] * inv_freq
        want = torch.cat((freqs.cos() * factor, freqs.sin() * factor), dim=-1)
        torch.testing.assert_close(get_rope(config, 32, 100).cos_sin_cache, want, atol=1e-6, rtol=1e-6)


def _run_latent_steps(model, seqs, schedule):
    """conftest's run_paged_steps with the latent layout: one [blocks, block_size, latent + rope] cache
    per layer (each token's vector stored once)."""
    from conftest import PAGED_BLOCK_SIZE, run_paged_steps

    cfg = SimpleNamespace(num_layers=len(model.model.stage_layers))
    return run_paged_steps(model, cfg, seqs, schedule,
                           layer_cache=lambda n: torch.zeros(n, PAGED_BLOCK_SIZE, LATENT + ROPE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_latent_cache_layout_gives_hf_logits(backend, deepseek_dir):
    """With one vector per token in the cache (attention/mla.py; the Triton kernel under the interpreter)."""
    from vllm_engine.attention.backend import get_attn_backend
    from vllm_engine.config import EngineArgs
    from vllm_engine.models.deepseek import DeepseekV2ForCausalLM

    path = deepseek_dir("v2")
    cfg = EngineArgs(model=str(path), dtype="float32", device="cpu", max_model_len=256).create_engine_config().model
    hf = load_hf_reference(path)
    model = DeepseekV2ForCausalLM(cfg.hf_config, get_attn_backend(torch.device("cpu"), backend), max_position=256)
    from safetensors.torch import load_file

    model.load_weights(load_file(str(path / "model.safetensors")).items())
    assert model.model.layers[0].self_attn.attn.cache_layout == "latent"
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (21, 9, 4)]
    got = _run_latent_steps(model.eval(), seqs, [[12, 0, 4], [8, 9, 0], [1, 0, 0]])
    for seq, lg in zip(seqs, got):
        with torch.no_grad():
            torch.testing.assert_close(torch.stack(lg), hf(torch.tensor([seq])).logits[0], atol=1e-4, rtol=1e-4)


def test_engine_caches_one_latent_vector_per_token_and_swaps_it(deepseek_dir):
    """The runner allocates the latent layout the attention declares ([blocks, block_size, L + rope]
    per layer): twice the blocks of K/V slots in the same space. Swap preemption moves those blocks
    (indexed on dim 0) and the greedy tokens stay HF's."""
    from transformers import AutoConfig

    from tests.models.family_helpers import MAX_TOKENS, PROMPTS, hf_greedy
    from vllm_engine import Engine, SamplingParams

    path = deepseek_dir("v2")
    cfg = AutoConfig.from_pretrained(str(path))
    space = 0.00002  # GiB: 16 blocks, too few for 4 requests at once
    engine = Engine(model=str(path), dtype="float32", max_model_len=128, seed=0, block_size=4, max_num_seqs=4,
                    max_num_batched_tokens=8, cpu_kv_cache_space=space, preemption_mode="swap", swap_space=0.01)
    cache = engine.model_runner.kv_cache.gpu_caches[0]
    dim = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.shape == (engine.num_gpu_blocks, 4, dim)
    assert engine.num_gpu_blocks == int(space * 2**30) // (4 * dim * 4 * cfg.num_hidden_layers)
    hf = load_hf_reference(path)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = engine.generate(PROMPTS * 3, params, use_tqdm=False)
    for out in outs[: len(PROMPTS)]:
        assert out.token_ids == hf_greedy(hf, list(out.prompt_token_ids), MAX_TOKENS)[0]
    assert [o.token_ids for o in outs] == [o.token_ids for o in outs[: len(PROMPTS)]] * 3
    assert engine.get_stats().num_swaps_total > 0
    engine.scheduler.check_integrity()
