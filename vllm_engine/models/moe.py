"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE.

Llama's decoder with the MLP replaced by a sparse block: a router (``gate``, [E, H], replicated on
every rank) picks the top ``num_experts_per_tok`` experts per token from a softmax; the experts run in
``layers/fused_moe.py``'s ``FusedMoE`` (one grouped GEMM per projection, each expert's intermediate
size split across tensor-parallel ranks like a dense MLP); one all-reduce sums the ranks' outputs.

* Mixtral: ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down), top-2 of 8,
  weights renormalized over the chosen k.
* Qwen2-MoE: ``mlp`` with experts ``gate_proj`` / ``up_proj`` / ``down_proj`` (``moe_intermediate_size``),
  ``norm_topk_prob``, plus a shared expert (``shared_expert_intermediate_size``) scaled by
  sigmoid(``shared_expert_gate`` x); q/k/v bias (``qkv_bias``).
* Qwen3-MoE: Qwen2-MoE's experts without the shared one (top-8 of 128, ``norm_topk_prob``), Qwen3's
  per-head q/k RMSNorm, ``head_dim`` from the config.
* Qwen: layers in ``mlp_only_layers``, or off the ``decoder_sparse_step`` pattern, keep a dense MLP.

Checkpoints name each expert's tensors separately (``...experts.7.w1.weight``); ``load_weights``
hands them to the ``FusedMoE`` loaders by (expert, role). Experts are unquantized only.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Iterable, Optional

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata
from vllm_engine.distributed import get_tp_group
from vllm_engine.layers.activation import SiluAndMul
from vllm_engine.layers.fused_moe import FusedMoE
from vllm_engine.layers.layernorm import RMSNorm
from vllm_engine.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm_engine.layers.rotary import RotaryEmbedding, get_rope
from vllm_engine.models.causal_lm import CausalLM
from vllm_engine.models.llama import LlamaAttention
from vllm_engine.models.utils import DecoderStack, head_dim
from vllm_engine.quantization.base import QuantizationConfig
from vllm_engine.quantization.unquantized import UnquantizedConfig

_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def check_silu(config: Any) -> None:
    """ValueError naming hidden_act unless it is SiLU (the experts' and dense MLPs' activation)."""
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"Unsupported hidden_act {act!r}: the MoE models support silu.")


def check_unquantized(quant_config: Optional[QuantizationConfig], why: str) -> None:
    """ValueError naming the quantization method and ``why`` unless the model is unquantized."""
    if quant_config is not None and not isinstance(quant_config, UnquantizedConfig):
        raise ValueError(f"Unsupported quantization_config {quant_config.get_name()!r} for {why}.")


class MoEAttention(LlamaAttention):
    """Llama's attention with the family's options: q/k/v bias (``qkv_bias``, ``attention_bias``) and
    Qwen3-MoE's q/k norm."""

    @staticmethod
    def options(config: Any) -> tuple[bool, bool, bool]:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return (bool(getattr(config, "qkv_bias", False) or attention_bias), attention_bias,
                config.model_type == "qwen3_moe")


class DenseMLP(nn.Module):
    """SwiGLU MLP (gate_up_proj | down_proj); ``reduce_results`` False leaves the all-reduce to the caller."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, quant_config: Optional[QuantizationConfig],
                 prefix: str, reduce_results: bool = True) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=False, params_dtype=dtype,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, hidden, bias=False, reduce_results=reduce_results, params_dtype=dtype,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_act(self.gate_up_proj(x), self.act_fn)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert); the ranks' partial sums reduced once."""

    def __init__(self, config: Any, num_experts: int, expert_inter: int, renormalize: bool, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.tp_group = get_tp_group()
        self.gate = ReplicatedLinear(hidden, num_experts, bias=False, params_dtype=dtype, quant_config=quant_config,
                                     prefix=f"{prefix}.gate")
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, hidden, expert_inter, renormalize, dtype,
                                reduce_results=False, prefix=f"{prefix}.experts")
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        if shared:
            self.shared_expert = DenseMLP(hidden, shared, dtype, quant_config, f"{prefix}.shared_expert",
                                          reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(hidden, 1, bias=False, params_dtype=dtype,
                                                       quant_config=quant_config, prefix=f"{prefix}.shared_expert_gate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.tp_group.world_size > 1:
            out = self.tp_group.all_reduce(out)
        return out


class MoEDecoderLayer(nn.Module):
    """``mlp_name``: the checkpoint's name of the feed-forward block (``block_sparse_moe`` or ``mlp``)."""

    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding,
                 dtype: torch.dtype, quant_config: Optional[QuantizationConfig], prefix: str, mlp_name: str) -> None:
        super().__init__()
        self.self_attn = MoEAttention(config, layer_idx, attn_backend, rotary_emb, dtype, quant_config,
                                      f"{prefix}.self_attn")
        self.add_module(mlp_name, _feed_forward(config, layer_idx, dtype, quant_config, f"{prefix}.{mlp_name}"))
        self.feed_forward = getattr(self, mlp_name)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = self.self_attn.qkv_proj.forward_norm(hidden, residual, self.input_layernorm)
        hidden = self.self_attn(positions, qkv, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.feed_forward(hidden), residual


def _feed_forward(config: Any, layer_idx: int, dtype: torch.dtype, quant_config: Optional[QuantizationConfig],
                  prefix: str) -> nn.Module:
    """The layer's sparse block, or (Qwen) a dense MLP on ``mlp_only_layers`` / off ``decoder_sparse_step``."""
    if config.model_type == "mixtral":
        return SparseMoeBlock(config, config.num_local_experts, config.intermediate_size, True, dtype,
                              quant_config, prefix)
    step = getattr(config, "decoder_sparse_step", 1) or 1
    sparse = (config.num_experts > 0 and layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
              and (layer_idx + 1) % step == 0)
    if not sparse:
        return DenseMLP(config.hidden_size, config.intermediate_size, dtype, quant_config, prefix)
    return SparseMoeBlock(config, config.num_experts, config.moe_intermediate_size,
                          bool(getattr(config, "norm_topk_prob", False)), dtype, quant_config, prefix)


class MoEModel(DecoderStack):
    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: int, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str = "model") -> None:
        super().__init__(config)
        check_silu(config)
        check_unquantized(quant_config, "a mixture of experts: the experts are unquantized only")
        self.embed_tokens = self.vocab_embedding(config, dtype, quant_config, f"{prefix}.embed_tokens")
        self.rotary_emb = get_rope(config, head_dim(config), max_position)
        mlp_name = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
        self.layers = self.stage_modules(lambda i: MoEDecoderLayer(config, i, attn_backend, self.rotary_emb, dtype,
                                                                   quant_config, f"{prefix}.layers.{i}", mlp_name))
        self.add_final_norm("norm", lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, dtype))


class MoECausalLM(CausalLM):
    """The MoE families' head and loading: per-expert checkpoint tensors go to the ``FusedMoE`` loaders
    (``expert_roles``: the checkpoint's projection name -> gate / up / down)."""

    model_class = MoEModel
    expert_roles: ClassVar[dict[str, str]] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def _moe_layers(self) -> dict[str, FusedMoE]:
        return {name: m for name, m in self.named_modules() if isinstance(m, FusedMoE)}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        moe = self._moe_layers()
        loaded: set[str] = set()

        def dense() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                m = _EXPERT_TENSOR.match(name)
                if m is None or m.group(1) not in moe or m.group(3) not in self.expert_roles:
                    yield name, tensor
                    continue
                layer, role = moe[m.group(1)], self.expert_roles[m.group(3)]
                param = layer.w2_weight if role == "down" else layer.w13_weight
                try:
                    param.weight_loader(param, tensor, (int(m.group(2)), role))
                except (ValueError, KeyError) as e:
                    raise ValueError(f"Weight {name} {e}.") from None
                loaded.add(name)

        return loaded | super().load_weights(dense())

    def expected_weights(self) -> set[str]:
        names = super().expected_weights()
        for prefix, layer in self._moe_layers().items():
            names -= {f"{prefix}.w13_weight", f"{prefix}.w2_weight"}
            names |= {f"{prefix}.{e}.{proj}.weight" for e in range(layer.num_experts) for proj in self.expert_roles}
        return names


class MixtralForCausalLM(MoECausalLM):
    expert_roles = {"w1": "gate", "w3": "up", "w2": "down"}


class Qwen2MoeForCausalLM(MoECausalLM):
    pass


class Qwen3MoeForCausalLM(MoECausalLM):
    pass


__all__ = ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"]
