"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``): LayerNorm with biases, rotary on the first
``partial_rotary_factor`` (``rotary_pct``) of each head, a GELU MLP, and the parallel residual
(``use_parallel_residual``: x + attn(ln1(x)) + mlp(ln2(x)); sequential otherwise).

The checkpoint's ``attention.query_key_value`` interleaves heads: its rows are [head 0 q, k, v,
head 1 q, k, v, ...]; ``load_weights`` regroups them into the q/k/v shards of our
``QKVParallelLinear`` (``query_key_value.q`` / ``.k`` / ``.v`` in its bookkeeping). The LM head is
``embed_out`` (transformers 5 names it ``lm_head``: both load).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata
from vllm_engine.layers.activation import get_act_fn
from vllm_engine.layers.attention import Attention
from vllm_engine.layers.layernorm import LayerNorm
from vllm_engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_engine.layers.rotary import RotaryEmbedding, get_rope
from vllm_engine.models.causal_lm import CausalLM
from vllm_engine.models.utils import DecoderStack
from vllm_engine.quantization.base import QuantizationConfig

NEOX_MAPPING = [(".query_key_value.", f".query_key_value.{s}.", s) for s in "qkv"]


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: Any, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        bias = bool(getattr(config, "attention_bias", True))
        self.query_key_value = QKVParallelLinear(hidden, head_dim, heads, heads, bias=bias, params_dtype=dtype,
                                                 quant_config=quant_config, prefix=f"{prefix}.query_key_value")
        self.dense = RowParallelLinear(hidden, hidden, bias=bias, params_dtype=dtype, quant_config=quant_config,
                                       prefix=f"{prefix}.dense")
        self.attn = Attention(self.query_key_value.num_heads, head_dim, self.query_key_value.num_kv_heads,
                              rotary_emb, attn_backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.dense(self.attn(positions, self.query_key_value(x), kv_cache, attn_metadata))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, quant_config: Optional[QuantizationConfig],
                 prefix: str) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.dense_h_to_4h = ColumnParallelLinear(hidden, inter, bias=True, params_dtype=dtype,
                                                  quant_config=quant_config, prefix=f"{prefix}.dense_h_to_4h")
        self.dense_4h_to_h = RowParallelLinear(inter, hidden, bias=True, params_dtype=dtype,
                                               quant_config=quant_config, prefix=f"{prefix}.dense_4h_to_h")
        self.act = get_act_fn(getattr(config, "hidden_act", "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: Any, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.use_parallel_residual = bool(getattr(config, "use_parallel_residual", True))
        self.input_layernorm = LayerNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps, dtype)
        self.attention = GPTNeoXAttention(config, attn_backend, rotary_emb, dtype, quant_config, f"{prefix}.attention")
        self.mlp = GPTNeoXMLP(config, dtype, quant_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream entering the layer is hidden + residual; returns (what the layer adds, the stream
        it adds to)."""
        x = hidden if residual is None else hidden + residual
        attn = self.attention(positions, self.input_layernorm(x), kv_cache, attn_metadata)
        if self.use_parallel_residual:
            return attn + self.mlp(self.post_attention_layernorm(x)), x
        h, x = self.post_attention_layernorm(attn, x)
        return self.mlp(h), x


class GPTNeoXModel(DecoderStack):
    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: int, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str = "gpt_neox") -> None:
        super().__init__(config)
        self.embed_in = self.vocab_embedding(config, dtype, quant_config, f"{prefix}.embed_in")
        self.rotary_emb = get_rope(config, config.hidden_size // config.num_attention_heads, max_position)
        self.layers = self.stage_modules(lambda i: GPTNeoXLayer(config, attn_backend, self.rotary_emb, dtype,
                                                                quant_config, f"{prefix}.layers.{i}"))
        self.add_final_norm("final_layer_norm", lambda: LayerNorm(config.hidden_size, config.layer_norm_eps, dtype))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_in(input_ids)


class GPTNeoXForCausalLM(CausalLM):
    model_class = GPTNeoXModel
    stacked_params_mapping = NEOX_MAPPING
    base_model_prefix = "gpt_neox"
    lm_head_name = "embed_out"
    embed_name = "embed_in"

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """Interleaved query_key_value regrouped into q, k, v; ``lm_head`` read as ``embed_out``; the
        old checkpoints' mask buffers dropped."""
        heads = self.config.num_attention_heads
        head_dim = self.config.hidden_size // heads
        for name, tensor in weights:
            if name.endswith((".attention.bias", ".attention.masked_bias")):
                continue
            if name == "lm_head.weight":
                name = "embed_out.weight"
            if ".query_key_value." in name:
                if tensor.shape[0] != 3 * heads * head_dim:
                    raise ValueError(f"Weight {name} has {tensor.shape[0]} rows, expected {3 * heads * head_dim}.")
                per_head = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:])
                for i, shard in enumerate("qkv"):
                    yield (name.replace(".query_key_value.", f".query_key_value.{shard}."),
                           per_head[:, i].reshape(heads * head_dim, *tensor.shape[1:]))
                continue
            yield name, tensor
