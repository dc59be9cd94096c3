"""Gemma 1, Gemma 2 and Gemma 3 (text) decoders over the shared layers.

What they share, read from the HF config:

* RMSNorm with gain ``1 + w`` (``GemmaRMSNorm``: loaded as 1 + w), embeddings scaled by
  sqrt(hidden_size) (rounded to the model dtype, as HF does), tied LM head by default.
* GeGLU: gelu(gate) * up, tanh approximation (``hidden_act`` / ``hidden_activation`` =
  ``gelu_pytorch_tanh``; exact ``gelu`` also accepted).

Gemma 2 and 3 add:

* "sandwich" norms: post-attention and post-feedforward RMSNorms on each block's output, a
  pre-feedforward norm before the MLP;
* the score scale ``query_pre_attn_scalar ** -0.5`` instead of head_dim ** -0.5;
* per-layer attention from ``layer_types``: ``sliding_attention`` layers see the last
  ``sliding_window`` tokens, ``full_attention`` layers everything;
* soft-capping ``c tanh(x / c)`` of attention scores (``attn_logit_softcapping``) and of the final
  logits (``final_logit_softcapping``) where set (Gemma 2 sets both; Gemma 3 neither).

Gemma 3 adds RMSNorm (1 + w) of each q and k head before rope, and two rope tables: local
(``sliding_attention``, theta 10k) and global (``full_attention``, theta 1M, possibly linear scaling).
Bidirectional attention (``use_bidirectional_attention``, EmbeddingGemma) is refused.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata
from vllm_engine.layers.activation import gelu_and_mul_for
from vllm_engine.layers.attention import Attention
from vllm_engine.layers.layernorm import GemmaRMSNorm
from vllm_engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_engine.layers.rotary import RotaryEmbedding, get_rope
from vllm_engine.models import utils
from vllm_engine.models.causal_lm import CausalLM, soft_cap
from vllm_engine.models.utils import DecoderStack, layer_sliding_window
from vllm_engine.quantization.base import QuantizationConfig


def _version(config: Any) -> int:
    """1, 2 or 3 from ``model_type`` (gemma, gemma2, gemma3_text)."""
    model_type = getattr(config, "model_type", "gemma")
    for version, prefix in ((3, "gemma3"), (2, "gemma2"), (1, "gemma")):
        if model_type.startswith(prefix):
            return version
    raise ValueError(f"Unsupported model_type {model_type!r} for the Gemma family (gemma, gemma2, gemma3_text).")


def _activation_field(config: Any, version: int) -> str:
    return "hidden_act" if version == 1 else "hidden_activation"


def gemma3_ropes(config: Any, head_dim: int, max_position: int) -> dict[str, RotaryEmbedding]:
    """Gemma 3's two rope tables by layer type: ``rope_parameters[layer_type]`` (transformers 5.x), or
    ``rope_theta`` + ``rope_scaling`` (global) and ``rope_local_base_freq`` (local) in 4.x configs."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params:
        by_type = {t: dict(params[t] or {}) for t in ("full_attention", "sliding_attention")}
    else:
        by_type = {"full_attention": {"rope_theta": getattr(config, "rope_theta", 1_000_000.0),
                                      **(getattr(config, "rope_scaling", None) or {})},
                   "sliding_attention": {"rope_theta": getattr(config, "rope_local_base_freq", 10_000.0)}}
    ropes = {}
    for layer_type, p in by_type.items():
        theta = float(p.get("rope_theta", 10_000.0))
        kind = p.get("rope_type", p.get("type", "default"))
        ropes[layer_type] = RotaryEmbedding(head_dim, max_position, theta, None if kind == "default" else p)
    return ropes


class GemmaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding,
                 dtype: torch.dtype, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        version = _version(config)
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = utils.head_dim(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, num_heads, num_kv_heads, bias=bias,
                                          params_dtype=dtype, quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(num_heads * head_dim, config.hidden_size, bias=bias, params_dtype=dtype,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        if version == 3:
            self.q_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps, dtype)
            self.k_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps, dtype)
        scale = config.query_pre_attn_scalar ** -0.5 if version >= 2 else head_dim ** -0.5
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, self.qkv_proj.num_kv_heads, rotary_emb, attn_backend,
                              layer_sliding_window(config, layer_idx), getattr(self, "q_norm", None),
                              getattr(self, "k_norm", None), scale=scale,
                              logits_soft_cap=getattr(config, "attn_logit_softcapping", None))

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attn(positions, qkv, kv_cache, attn_metadata))


class GemmaMLP(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, quant_config: Optional[QuantizationConfig],
                 prefix: str) -> None:
        super().__init__()
        field = _activation_field(config, _version(config))
        self.act_fn = gelu_and_mul_for(getattr(config, field, None) or "gelu_pytorch_tanh", field)
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=False, params_dtype=dtype,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, hidden, bias=False, params_dtype=dtype, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_act(gate_up, self.act_fn)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding,
                 dtype: torch.dtype, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(config, layer_idx, attn_backend, rotary_emb, dtype, quant_config,
                                        f"{prefix}.self_attn")
        self.mlp = GemmaMLP(config, dtype, quant_config, f"{prefix}.mlp")
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps, dtype)
        self.sandwich = _version(config) >= 2
        if self.sandwich:
            self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps, dtype)
            self.post_feedforward_layernorm = GemmaRMSNorm(size, eps, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it): the next norm adds them."""
        qkv, residual = self.self_attn.qkv_proj.forward_norm(hidden, residual, self.input_layernorm)
        hidden = self.self_attn(positions, qkv, kv_cache, attn_metadata)
        if not self.sandwich:
            gate_up, residual = self.mlp.gate_up_proj.forward_norm(hidden, residual, self.post_attention_layernorm)
            return self.mlp(gate_up), residual
        hidden = self.post_attention_layernorm(hidden)
        gate_up, residual = self.mlp.gate_up_proj.forward_norm(hidden, residual, self.pre_feedforward_layernorm)
        return self.post_feedforward_layernorm(self.mlp(gate_up)), residual


class GemmaModel(DecoderStack):
    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: int, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str = "model") -> None:
        super().__init__(config)
        version = _version(config)
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Unsupported use_bidirectional_attention=True: only causal Gemma decoders are served.")
        self.embed_tokens = self.vocab_embedding(config, dtype, quant_config, f"{prefix}.embed_tokens")
        # HF multiplies by sqrt(hidden) rounded to the model dtype (bf16: sqrt(3072) = 55.5).
        self.register_buffer("normalizer", torch.tensor(config.hidden_size ** 0.5, dtype=dtype), persistent=False)
        head_dim = utils.head_dim(config)
        if version == 3:
            ropes = gemma3_ropes(config, head_dim, max_position)
            self.rotary_emb = ropes["full_attention"]
            self.rotary_emb_local = ropes["sliding_attention"]
        else:
            self.rotary_emb = get_rope(config, head_dim, max_position)
            self.rotary_emb_local = self.rotary_emb

        def rope(i: int) -> RotaryEmbedding:
            return self.rotary_emb_local if layer_sliding_window(config, i) else self.rotary_emb

        self.layers = self.stage_modules(lambda i: GemmaDecoderLayer(config, i, attn_backend, rope(i), dtype,
                                                                     quant_config, f"{prefix}.layers.{i}"))
        self.add_final_norm("norm", lambda: GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.normalizer


class GemmaForCausalLM(CausalLM):
    """Gemma 1/2/3 text (``GemmaForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``); the final
    logits soft-capped where the config says so."""

    model_class = GemmaModel
    default_tie_word_embeddings = True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_cap(self.logits_processor(self.head, hidden),
                        getattr(self.config, "final_logit_softcapping", None))


class Gemma3ForConditionalGeneration(GemmaForCausalLM):
    """A multimodal Gemma 3 checkpoint (4B and up) served text-only: its language model, from
    ``language_model.model.*`` (``model.language_model.*`` in transformers 5 files) and
    ``language_model.lm_head`` / ``lm_head``; the vision tower and projector are not loaded (no
    image input yet). The config is the checkpoint's ``text_config`` (model_loader/resolve.py)."""

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            for old, new in (("language_model.model.", "model."), ("model.language_model.", "model."),
                             ("language_model.lm_head.", "lm_head.")):
                if name.startswith(old):
                    yield new + name[len(old):], tensor
                    break
            else:
                if not name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                        "model.multi_modal_projector.")):
                    yield name, tensor
