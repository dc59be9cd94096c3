"""What one decode step must read and compute, per model family, from an HF config: the benchmarks'
floors and rooflines (common.py) use it.

* Weights: every layer's attention and dense MLP matrices and the LM head, once per step; of a
  mixture of experts only the experts the step's tokens touch (the router and shared experts
  always). ``expected_experts_touched`` is the expectation under uniform routing: E (1 - (1 - k/E)^n)
  for n tokens choosing k of E each.
* KV cache: the bytes per token the engine allocates (DeepSeek: one [latent | rope] vector, held in
  both the K and the V slot today), and what a decode reads for a context (sliding-window layers
  read at most their window).
* FLOPs: 2 per multiply-add of the matrices one token goes through (its k experts only).

Families: Llama-like (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3), GPT-2 / GPT-NeoX, Mixtral / Qwen2-MoE
/ Qwen3-MoE, DeepSeek-V2/V3. Norms, biases and the embedding lookup are left out (negligible).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class LayerCosts:
    """Parameter counts of one decoder layer."""

    dense: int  # attention + (dense MLP or router + shared experts): read by every step
    expert: int = 0  # one routed expert (gate, up, down)
    num_experts: int = 0
    top_k: int = 0


def _type(cfg: Any) -> str:
    return getattr(cfg, "model_type", None) or "llama"


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _attention_params(cfg: Any) -> int:
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if _type(cfg).startswith("deepseek"):
        qk, heads = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.num_attention_heads
        q = (h * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk) if cfg.q_lora_rank else h * heads * qk
        kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim
                                                                                          + cfg.v_head_dim)
        return q + kv + heads * cfg.v_head_dim * h
    if _type(cfg) in ("gpt2", "gpt_neox"):
        return 4 * h * h
    kv, hd = getattr(cfg, "num_key_value_heads", None) or heads, _head_dim(cfg)
    return h * hd * (heads + 2 * kv) + heads * hd * h


def _is_sparse(cfg: Any, i: int) -> bool:
    t = _type(cfg)
    if t == "mixtral":
        return True
    if t in ("qwen2_moe", "qwen3_moe"):
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        return cfg.num_experts > 0 and i not in (getattr(cfg, "mlp_only_layers", None) or []) and (i + 1) % step == 0
    if t.startswith("deepseek"):
        return bool(cfg.n_routed_experts) and i >= cfg.first_k_dense_replace and \
            i % (getattr(cfg, "moe_layer_freq", 1) or 1) == 0
    return False


def layer_costs(cfg: Any) -> list[LayerCosts]:
    """Per decoder layer: what every step reads, and the routed experts."""
    h, t = cfg.hidden_size, _type(cfg)
    out = []
    for i in range(cfg.num_hidden_layers):
        attn = _attention_params(cfg)
        if t in ("gpt2", "gpt_neox"):
            inner = getattr(cfg, "n_inner", None) or getattr(cfg, "intermediate_size", None) or 4 * h
            out.append(LayerCosts(attn + 2 * h * inner))
            continue
        if not _is_sparse(cfg, i):
            out.append(LayerCosts(attn + 3 * h * cfg.intermediate_size))
            continue
        if t == "mixtral":
            experts, inter, shared = cfg.num_local_experts, cfg.intermediate_size, 0
        elif t.startswith("deepseek"):
            experts, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
            shared = 3 * h * inter * (cfg.n_shared_experts or 0)
        else:
            experts, inter = cfg.num_experts, cfg.moe_intermediate_size
            shared_inter = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
            shared = 3 * h * shared_inter + (h if shared_inter else 0)  # + its sigmoid gate
        out.append(LayerCosts(attn + h * experts + shared, 3 * h * inter, experts, cfg.num_experts_per_tok))
    return out


def expected_experts_touched(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Distinct experts n tokens touch when each picks k of E uniformly: E (1 - (1 - k/E)^n)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def weight_bytes(cfg: Any, bytes_per_param: int = 2, num_tokens: Optional[int] = None) -> int:
    """Bytes of weights one step over ``num_tokens`` tokens reads (None: every expert) + the LM head."""
    total = 0.0
    for layer in layer_costs(cfg):
        experts = layer.num_experts if num_tokens is None or not layer.num_experts else \
            expected_experts_touched(layer.num_experts, layer.top_k, num_tokens)
        total += layer.dense + experts * layer.expert
    return int(round((total + cfg.vocab_size * cfg.hidden_size) * bytes_per_param))


def linear_flops_per_token(cfg: Any) -> int:
    """2 x the multiply-adds of the layers' matrices one token goes through (its top-k experts; no LM head)."""
    return 2 * sum(layer.dense + layer.top_k * layer.expert for layer in layer_costs(cfg))


def _kv_elems_per_layer(cfg: Any) -> int:
    if _type(cfg).startswith("deepseek"):
        return 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # the [latent | rope] vector in K and in V
    if _type(cfg) in ("gpt2", "gpt_neox"):
        return 2 * cfg.hidden_size
    heads = cfg.num_attention_heads
    return 2 * (getattr(cfg, "num_key_value_heads", None) or heads) * _head_dim(cfg)


def kv_bytes_per_token(cfg: Any, bytes_per_elem: int = 2) -> int:
    """KV-cache bytes the engine allocates per token (all layers)."""
    return cfg.num_hidden_layers * _kv_elems_per_layer(cfg) * bytes_per_elem


def kv_read_bytes(cfg: Any, context: int, bytes_per_elem: int = 2) -> int:
    """KV bytes one decode reads for a sequence of ``context`` tokens: a sliding-window layer at most
    its window."""
    from vllm_engine.models.utils import layer_sliding_window

    per_layer = _kv_elems_per_layer(cfg) * bytes_per_elem
    return sum(per_layer * min(context, layer_sliding_window(cfg, i) or context)
               for i in range(cfg.num_hidden_layers))
