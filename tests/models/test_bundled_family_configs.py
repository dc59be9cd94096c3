"""The bundled configs of the issue-20 benchmark shapes (Qwen3-30B-A3B, Mixtral-8x7B, Gemma-2-9B,
DeepSeek-V2-Lite) resolve to our model classes and run with dummy weights when shrunk (real head layout, experts,
windows and soft caps; fewer layers, narrower, a small vocabulary)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.config import ModelConfig
from vllm_engine.model_loader import get_model
from vllm_engine.model_loader.resolve import bundled_configs, resolve_model

SHRINK = {
    "qwen3-30b-a3b": dict(hidden_size=256, moe_intermediate_size=64, intermediate_size=256),
    "mixtral-8x7b": dict(hidden_size=512, intermediate_size=128),
    "gemma-2-9b": dict(hidden_size=256, intermediate_size=256),
    "deepseek-v2-lite": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=64),
}


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_bundled_config_runs_shrunk_with_dummy_weights(name, run_paged):
    from vllm_engine.layers.attention import Attention
    from vllm_engine.layers.fused_moe import FusedMoE

    assert name in bundled_configs()
    r = resolve_model(name)
    assert r.load_format == "dummy"
    hf = copy.deepcopy(r.hf_config)
    for k, v in dict(SHRINK[name], num_hidden_layers=2, vocab_size=512).items():
        setattr(hf, k, v)
    cfg = ModelConfig(model=name, model_path=r.model_path, load_format="dummy", hf_config=hf, dtype=torch.float32,
                      max_model_len=64, seed=0, served_model_name=name)
    model = get_model(cfg, torch.device("cpu"), TorchAttentionBackend())
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert attn[0].num_heads == r.hf_config.num_attention_heads
    if name == "deepseek-v2-lite":  # one [latent | rope] vector per token: 512 + 64
        assert (attn[0].num_kv_heads, attn[0].head_dim) == (1, 576) and len(experts) == 1
        assert experts[0].num_experts == 64 and experts[0].top_k == 6
    elif name == "gemma-2-9b":
        assert [a.sliding_window for a in attn] == [4096, None] and attn[0].logits_soft_cap == 50.0
    else:
        n = r.hf_config.num_experts if name.startswith("qwen3") else r.hf_config.num_local_experts
        assert len(experts) == 2 and experts[0].num_experts == n
        assert experts[0].top_k == r.hf_config.num_experts_per_tok
    if name == "deepseek-v2-lite":
        cfg = SimpleNamespace(num_kv_heads=1, head_dim=576, num_layers=2, vocab_size=512)
    logits = torch.stack(run_paged(model, cfg, [[1, 2, 3, 4, 5]], [[3], [1], [1]])[0])
    assert logits.shape == (5, 512) and torch.isfinite(logits).all()
    if name == "gemma-2-9b":
        assert logits.abs().max() <= 30.0
