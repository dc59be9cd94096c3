"""model_costs.py's parameter counts are the matrices our models hold (built from shrunk bundled
configs of every family, dummy weights); the touched-expert expectation and the KV bytes follow."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_costs as C  # noqa: E402

from vllm_engine.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from vllm_engine.config import ModelConfig  # noqa: E402
from vllm_engine.model_loader import get_model  # noqa: E402
from vllm_engine.model_loader.resolve import resolve_model  # noqa: E402

SHRINK = {
    "llama-3.1-8b": dict(hidden_size=256, intermediate_size=256),
    "gemma-2-9b": dict(hidden_size=256, intermediate_size=256),
    "mixtral-8x7b": dict(hidden_size=256, intermediate_size=128),
    "qwen3-30b-a3b": dict(hidden_size=256, moe_intermediate_size=64, intermediate_size=256),
    "deepseek-v2-lite": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3),
}


def _shrunk(name):
    r = resolve_model(name)
    hf = copy.deepcopy(r.hf_config)
    for k, v in {"num_hidden_layers": 2, "vocab_size": 512, **SHRINK[name]}.items():
        setattr(hf, k, v)
    return hf, ModelConfig(model=name, model_path=r.model_path, load_format="dummy", hf_config=hf,
                           dtype=torch.float32, max_model_len=64, seed=0, served_model_name=name)


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_weight_counts_are_the_models_matrices(name):
    hf, cfg = _shrunk(name)
    model = get_model(cfg, torch.device("cpu"), TorchAttentionBackend())
    embed = {id(m.weight) for n, m in model.named_modules() if n.endswith(("embed_tokens", "wte", "wpe", "embed_in"))}
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in embed)
    head = 0 if model.tie_word_embeddings else hf.vocab_size * hf.hidden_size  # counted above when untied
    assert C.weight_bytes(hf, 1) == matrices - head + hf.vocab_size * hf.hidden_size
    kv = sum(c.numel() // 64 for c in _caches(model))  # per token: the cache tensors over 64 slots
    assert C.kv_bytes_per_token(hf, 1) == kv


def _caches(model):
    from vllm_engine.layers.attention import Attention

    return [torch.zeros(2, 16, 4, a.num_kv_heads, a.head_dim) for a in model.modules() if isinstance(a, Attention)]


def test_touched_experts_and_flops():
    hf, _ = _shrunk("qwen3-30b-a3b")
    assert C.expected_experts_touched(128, 8, 1) == pytest.approx(8)
    assert C.expected_experts_touched(128, 8, 1000) == pytest.approx(128)
    one, all_experts = C.weight_bytes(hf, 1, num_tokens=1), C.weight_bytes(hf, 1)
    per_expert = 3 * hf.hidden_size * hf.moe_intermediate_size
    assert all_experts - one == pytest.approx(2 * (128 - 8) * per_expert, abs=2)
    dense = sum(layer.dense for layer in C.layer_costs(hf))
    assert C.linear_flops_per_token(hf) == 2 * (dense + 2 * 8 * per_expert)


def test_sliding_window_layers_read_at_most_their_window():
    hf, _ = _shrunk("gemma-2-9b")  # layer 0 slides over 4096 tokens, layer 1 is global
    per_layer = C.kv_bytes_per_token(hf) // 2
    assert C.kv_read_bytes(hf, 1000) == 2 * 1000 * per_layer
    assert C.kv_read_bytes(hf, 10000) == (4096 + 10000) * per_layer
