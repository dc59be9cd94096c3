"""GPT-2 (``GPT2LMHeadModel``) and GPT-BigCode (StarCoder): learned absolute positions, pre-LayerNorm blocks with biases, a GELU
MLP (``activation_function``, gelu_new by default), multi-head attention without rotary, tied head.

The checkpoint's linear layers are Conv1D: weights stored [in, out], transposed on loading; the
fused ``attn.c_attn`` (q | k | v columns) is cut into the three shards of our ``QKVParallelLinear``
(named ``c_attn.q`` / ``.k`` / ``.v`` in ``load_weights``' bookkeeping). Old checkpoints' mask
buffers (``attn.bias``, ``attn.masked_bias``) are skipped. Tensor parallelism splits heads and MLP
columns as for Llama; the position table is replicated.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata
from vllm_engine.layers.activation import get_act_fn
from vllm_engine.layers.attention import Attention
from vllm_engine.layers.layernorm import LayerNorm
from vllm_engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_engine.layers.utils import default_weight_loader, set_weight_attrs
from vllm_engine.models.causal_lm import CausalLM
from vllm_engine.models.utils import DecoderStack
from vllm_engine.quantization.base import QuantizationConfig

GPT2_MAPPING = [(".c_attn.", f".c_attn.{s}.", s) for s in "qkv"]
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class PositionEmbedding(nn.Module):
    """A learned absolute position table ``weight [max_positions, hidden]``, whole on every rank:
    ``pos(positions [T]) -> [T, hidden]``."""

    def __init__(self, max_positions: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, hidden_size, dtype=dtype), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight)


class GPT2Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads  # GPT-BigCode's multi-query: 1
        self.c_attn = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True, params_dtype=dtype,
                                        quant_config=quant_config, prefix=f"{prefix}.c_attn")
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True, params_dtype=dtype, quant_config=quant_config,
                                        prefix=f"{prefix}.c_proj")
        scale = head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = Attention(self.c_attn.num_heads, head_dim, self.c_attn.num_kv_heads, None, attn_backend,
                              scale=scale)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.c_proj(self.attn(positions, self.c_attn(x), kv_cache, attn_metadata))


class GPT2MLP(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, quant_config: Optional[QuantizationConfig],
                 prefix: str) -> None:
        super().__init__()
        hidden = config.hidden_size
        inner = getattr(config, "n_inner", None) or 4 * hidden
        self.c_fc = ColumnParallelLinear(hidden, inner, bias=True, params_dtype=dtype, quant_config=quant_config,
                                         prefix=f"{prefix}.c_fc")
        self.c_proj = RowParallelLinear(inner, hidden, bias=True, params_dtype=dtype, quant_config=quant_config,
                                        prefix=f"{prefix}.c_proj")
        self.act = get_act_fn(getattr(config, "activation_function", "gelu_new"), "activation_function")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps, dtype)
        self.attn = GPT2Attention(config, layer_idx, attn_backend, dtype, quant_config, f"{prefix}.attn")
        self.ln_2 = LayerNorm(config.hidden_size, eps, dtype)
        self.mlp = GPT2MLP(config, dtype, quant_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(this block's MLP output, the residual stream before it): the next LayerNorm adds them."""
        if residual is None:
            x, residual = self.ln_1(hidden), hidden
        else:
            x, residual = self.ln_1(hidden, residual)
        x, residual = self.ln_2(self.attn(positions, x, kv_cache, attn_metadata), residual)
        return self.mlp(x), residual


class GPT2Model(DecoderStack):
    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: int, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str = "transformer") -> None:
        super().__init__(config)
        if getattr(config, "add_cross_attention", False):
            raise ValueError("Unsupported add_cross_attention=True: GPT-2 is served as a decoder only.")
        self.wte = self.vocab_embedding(config, dtype, quant_config, f"{prefix}.wte")
        self.wpe = self.first_stage_only(
            lambda: PositionEmbedding(config.max_position_embeddings, config.hidden_size, dtype))
        self.h = self.stage_modules(lambda i: GPT2Block(config, i, attn_backend, dtype, quant_config,
                                                        f"{prefix}.h.{i}"))
        self.add_final_norm("ln_f", lambda: LayerNorm(config.hidden_size, config.layer_norm_epsilon, dtype))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids) + self.wpe(positions)


class GPT2LMHeadModel(CausalLM):
    model_class = GPT2Model
    stacked_params_mapping = GPT2_MAPPING
    default_tie_word_embeddings = True
    base_model_prefix = "transformer"
    embed_name = "wte"

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """Conv1D weights transposed to [out, in]; c_attn cut into q, k, v; mask buffers dropped."""
        for name, tensor in weights:
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if name.endswith(_CONV1D):
                tensor = tensor.t()
            if ".c_attn." in name:
                hidden = self.config.hidden_size
                if tensor.shape[0] != 3 * hidden:
                    raise ValueError(f"Weight {name} has {tensor.shape[0]} q/k/v rows, expected {3 * hidden}.")
                for shard, part in zip("qkv", tensor.split(hidden, dim=0)):
                    yield name.replace(".c_attn.", f".c_attn.{shard}."), part
                continue
            if not name.startswith(("transformer.", "lm_head.")):  # a bare GPT2Model checkpoint
                name = f"transformer.{name}"
            yield name, tensor


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    """GPT-BigCode (StarCoder, SantaCoder): GPT-2's blocks with ``nn.Linear`` weights (no transpose) and
    multi-query attention (``multi_query``: c_attn rows q | k | v with one KV head; otherwise each
    head's q, k, v rows interleaved, regrouped here)."""

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        cfg = self.config
        heads, hidden = cfg.num_attention_heads, cfg.hidden_size
        head_dim = hidden // heads
        for name, tensor in weights:
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if ".c_attn." not in name:
                yield name, tensor
                continue
            if cfg.multi_query:
                parts = tensor.split([hidden, head_dim, head_dim], dim=0)
            else:
                per_head = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:])
                parts = [per_head[:, i].reshape(hidden, *tensor.shape[1:]) for i in range(3)]
            for shard, part in zip("qkv", parts):
                yield name.replace(".c_attn.", f".c_attn.{shard}."), part
