"""One Llama-family decoder: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Yi.

What differs between them is read from the HF config:

* GQA/MQA: ``num_key_value_heads``; ``head_dim`` from the config when given (Qwen3), else hidden / heads.
* rope: ``rope_theta`` and ``rope_scaling`` (llama3, linear), transformers 4.x or 5.x spelling.
* Qwen2: bias on q/k/v (not o); Llama ``attention_bias``: bias on q/k/v and o; ``mlp_bias``.
* Qwen3: RMSNorm over each head of q and k before rope.
* Mistral: sliding-window attention when ``sliding_window`` is set (Qwen2/3 only with ``use_sliding_window``).
* ``tie_word_embeddings``: the LM head is the embedding.

Built from the shared layers (layers/): parameters keep HF names except the fused ``qkv_proj``
(q | k | v) and ``gate_up_proj`` (gate | up), filled shard by shard through each parameter's
``weight_loader``. Tensor parallelism (heads, MLP columns, vocabulary split across ranks) and the
pipeline stage (which layers this process holds) come from ``vllm_engine.distributed`` when the
model is built; kernels (cuBLAS or Triton, folded norms) from the quant method.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata
from vllm_engine.layers.activation import SiluAndMul
from vllm_engine.layers.attention import Attention
from vllm_engine.layers.layernorm import RMSNorm
from vllm_engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_engine.layers.rotary import RotaryEmbedding, get_rope
from vllm_engine.models import utils
from vllm_engine.models.causal_lm import CausalLM
from vllm_engine.models.utils import layer_sliding_window
from vllm_engine.quantization.base import QuantizationConfig

class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding,
                 dtype: torch.dtype, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = utils.head_dim(config)
        qkv_bias, o_bias, qk_norm = self.options(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, num_heads, num_kv_heads, bias=qkv_bias,
                                          params_dtype=dtype, quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(num_heads * head_dim, config.hidden_size, bias=o_bias, params_dtype=dtype,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, self.qkv_proj.num_kv_heads, rotary_emb, attn_backend,
                              layer_sliding_window(config, layer_idx), getattr(self, "q_norm", None),
                              getattr(self, "k_norm", None))

    @staticmethod
    def options(config: Any) -> tuple[bool, bool, bool]:
        """(bias on q/k/v, bias on o, RMSNorm on each q and k head): Qwen2 biases q/k/v, Llama's
        ``attention_bias`` all four; Qwen3 norms q and k."""
        model_type = getattr(config, "model_type", "llama")
        attention_bias = bool(getattr(config, "attention_bias", False))
        return attention_bias or model_type == "qwen2", attention_bias and model_type != "qwen2", model_type == "qwen3"

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """qkv: the input already projected by ``qkv_proj`` (the decoder layer does it, with its norm)."""
        return self.o_proj(self.attn(positions, qkv, kv_cache, attn_metadata))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, quant_config: Optional[QuantizationConfig],
                 prefix: str) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"Unsupported hidden_act {act!r}: the Llama-family model supports silu.")
        bias = bool(getattr(config, "mlp_bias", False))
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias, params_dtype=dtype,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias, params_dtype=dtype, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: the input already projected by ``gate_up_proj`` (the decoder layer does it, with its norm)."""
        return self.down_proj.forward_act(gate_up, self.act_fn)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding,
                 dtype: torch.dtype, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, attn_backend, rotary_emb, dtype, quant_config,
                                        f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, dtype, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it): the next norm adds them.
        Each norm goes with the projection after it (``forward_norm``: one kernel where that is faster)."""
        qkv, residual = self.self_attn.qkv_proj.forward_norm(hidden, residual, self.input_layernorm)
        hidden = self.self_attn(positions, qkv, kv_cache, attn_metadata)
        gate_up, residual = self.mlp.gate_up_proj.forward_norm(hidden, residual, self.post_attention_layernorm)
        return self.mlp(gate_up), residual


class LlamaModel(utils.DecoderStack):
    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: int, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str = "model") -> None:
        super().__init__(config)
        self.embed_tokens = self.vocab_embedding(config, dtype, quant_config, f"{prefix}.embed_tokens")
        self.rotary_emb = get_rope(config, utils.head_dim(config), max_position)
        self.layers = self.stage_modules(lambda i: LlamaDecoderLayer(config, i, attn_backend, self.rotary_emb, dtype,
                                                                     quant_config, f"{prefix}.layers.{i}"))
        self.add_final_norm("norm", lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, dtype))


class LlamaForCausalLM(CausalLM):
    """Every Llama-family decoder (registry.py): ``LlamaModel`` under ``model``, the LM head (or the
    tied embedding), and separate q/k/v and gate/up checkpoint tensors fused on loading."""

    model_class = LlamaModel
