"""DeepSeek-V2 / V2-Lite / V3: multi-head latent attention (MLA) and DeepSeek's mixture of experts.

Attention. Each token's keys and values come from one latent ``c = kv_a_layernorm(kv_a)`` of
``kv_lora_rank`` L dims and one rotary key ``k_pe`` of ``qk_rope_head_dim`` dims shared by all heads;
``kv_b_proj`` expands c into each head's k_nope (``qk_nope_head_dim``) and v (``v_head_dim``). With the
expansion absorbed (q_nope . W_uk c = (W_uk^T q_nope) . c, and sum_t p_t W_uv c_t = W_uv sum_t p_t c_t),
attention is multi-query attention over one "head" of L + rope dims per token, [c | k_pe], for the
key and the value alike: the cache holds that vector, never per-head K/V, and the output's first L
dims are mapped back per head by W_uv. The paged cache's layout [2, blocks, block_size, kv_heads,
head_dim] stores it twice (K and V slots); given a cache of the latent layout [blocks, block_size,
L + rope] (attention/mla.py: ``Attention.cache_layout == "latent"``) the model stores it once and
attends with the latent kernel; the runner allocates that layout (worker/kv_cache.py).
Rope: interleaved pairs (``rope_interleave``, V2 always), YaRN with DeepSeek's mscale in the
score scale.

Experts. ``first_k_dense_replace`` dense layers, then MoE layers: routed experts (``FusedMoE``) chosen
by a float32 router, V2 softmax ``greedy`` / ``group_limited_greedy``, V3 sigmoid scores with
``e_score_correction_bias`` over ``n_group`` groups (``topk_group`` kept), weights times
``routed_scaling_factor`` (V3: normalized first with ``norm_topk_prob``), plus ``n_shared_experts``
always-on experts as one dense MLP. V3's multi-token-prediction layers in the checkpoint are skipped.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata
from vllm_engine.attention.mla import mla_attention, write_latent
from vllm_engine.distributed import get_tp_group
from vllm_engine.layers.attention import Attention
from vllm_engine.layers.fused_moe import FusedMoE, grouped_top_k, select_experts
from vllm_engine.layers.layernorm import RMSNorm
from vllm_engine.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm_engine.layers.rotary import RotaryEmbedding, apply_rotary, rope_params, yarn_mscale
from vllm_engine.layers.utils import default_weight_loader, set_weight_attrs
from vllm_engine.models.moe import DenseMLP, MoECausalLM, check_silu, check_unquantized
from vllm_engine.models.utils import DecoderStack
from vllm_engine.quantization.base import QuantizationConfig


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's rope on interleaved pairs (x0, x1), (x2, x3)...: x [T, heads, d], cos/sin [T, d / 2];
    the result is laid out [rotated evens | rotated odds] (as HF's V3 code), which changes no dot
    product between a rotated q and a rotated k. Float32 inside, x's dtype out."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def mla_scale(config: Any) -> float:
    """(nope + rope dims)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's scaling)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    _, scaling = rope_params(config)
    if scaling and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    return scale


class MLAAttention(nn.Module):
    def __init__(self, config: Any, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.latent = config.kv_lora_rank
        bias = bool(getattr(config, "attention_bias", False))
        qk = self.nope + self.rope
        kw = dict(params_dtype=dtype, quant_config=quant_config)
        if config.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, config.q_lora_rank, bias=bias, prefix=f"{prefix}.q_a_proj", **kw)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6, dtype)
            self.q_b_proj = ColumnParallelLinear(config.q_lora_rank, heads * qk, bias=False,
                                                 prefix=f"{prefix}.q_b_proj", **kw)
        else:
            self.q_proj = ColumnParallelLinear(hidden, heads * qk, bias=False, prefix=f"{prefix}.q_proj", **kw)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.latent + self.rope, bias=bias,
                                                   prefix=f"{prefix}.kv_a_proj_with_mqa", **kw)
        self.kv_a_layernorm = RMSNorm(self.latent, 1e-6, dtype)
        self.kv_b_proj = ColumnParallelLinear(self.latent, heads * (self.nope + self.v_dim), bias=False,
                                              prefix=f"{prefix}.kv_b_proj", **kw)
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias=bias, prefix=f"{prefix}.o_proj", **kw)
        self.num_heads = heads // get_tp_group().world_size
        self.interleaved = bool(getattr(config, "rope_interleave", True))
        object.__setattr__(self, "rotary_emb", rotary_emb)  # shared, not registered here
        self.attn = Attention(self.num_heads, self.latent + self.rope, 1, None, attn_backend, scale=mla_scale(config),
                              cache_layout="latent")

    def _rope(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary_emb.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        return rotate_interleaved(x, cos, sin) if self.interleaved else apply_rotary(x, cos, sin)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_nope, q_pe = q.view(t, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.latent, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.latent)
        query = torch.cat((torch.einsum("thd,hdl->thl", q_nope, w[:, : self.nope]), self._rope(positions, q_pe)), -1)
        key = torch.cat((latent, self._rope(positions, k_pe.unsqueeze(1)).squeeze(1)), -1).unsqueeze(1)
        out = self._attend(query.contiguous(), key, kv_cache, attn_metadata)
        out = torch.einsum("thl,hvl->thv", out, w[:, self.nope:])
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))


    def _attend(self, query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """[T, heads, L]: over the latent layout [blocks, block_size, L + rope] (one vector per token), or
        the K/V layout with the vector as both key and value (the output's first L dims kept)."""
        if kv_cache.dim() == 3:
            write_latent(key.squeeze(1), kv_cache, attn_metadata.slot_mapping)
            return mla_attention(query, kv_cache, attn_metadata, self.attn.scale, self.latent,
                                 use_triton=self.attn.attn_backend.name == "triton")
        return self.attn.attend(query, key, key, kv_cache, attn_metadata)[..., : self.latent]


class DeepseekRouter(nn.Module):
    """The router's float32 ``weight`` [E, H] (and V3's ``e_score_correction_bias`` [E]), replicated."""

    def __init__(self, hidden: int, num_experts: int, with_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})
        if with_bias:
            self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32),
                                                        requires_grad=False)
            set_weight_attrs(self.e_score_correction_bias, {"weight_loader": default_weight_loader})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)


class DeepseekMoE(nn.Module):
    """Routed experts + shared experts; the ranks' partial sums reduced once."""

    def __init__(self, config: Any, dtype: torch.dtype, quant_config: Optional[QuantizationConfig],
                 prefix: str) -> None:
        super().__init__()
        self.v3 = config.model_type == "deepseek_v3"
        self.method = "noaux_tc" if self.v3 else (getattr(config, "topk_method", None) or "greedy")
        if self.method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"Unsupported topk_method {self.method!r}: greedy, group_limited_greedy or noaux_tc.")
        if not self.v3 and getattr(config, "norm_topk_prob", False):
            raise ValueError("Unsupported norm_topk_prob=True for DeepSeek-V2 (no released V2 checkpoint sets it).")
        hidden, num_experts = config.hidden_size, config.n_routed_experts
        self.top_k, self.scale = config.num_experts_per_tok, float(config.routed_scaling_factor)
        self.num_groups, self.top_groups = config.n_group or 1, config.topk_group or 1
        self.normalize = self.v3 and bool(getattr(config, "norm_topk_prob", False))
        self.tp_group = get_tp_group()
        self.gate = DeepseekRouter(hidden, num_experts, with_bias=self.v3)
        self.experts = FusedMoE(num_experts, self.top_k, hidden, config.moe_intermediate_size, False, dtype,
                                reduce_results=False, prefix=f"{prefix}.experts")
        if config.n_shared_experts:
            self.shared_experts = DenseMLP(hidden, config.moe_intermediate_size * config.n_shared_experts, dtype,
                                           quant_config, f"{prefix}.shared_experts", reduce_results=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        if self.method == "greedy":
            weights, ids = select_experts(logits, self.top_k, renormalize=False)
        else:
            scoring = "sigmoid" if self.v3 else "softmax"
            weights, ids = grouped_top_k(logits, self.top_k, self.num_groups, self.top_groups, scoring,
                                         getattr(self.gate, "e_score_correction_bias", None))
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts.forward_routed(x, *self.route(x))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        if self.tp_group.world_size > 1:
            out = self.tp_group.all_reduce(out)
        return out


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding,
                 dtype: torch.dtype, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        self.self_attn = MLAAttention(config, attn_backend, rotary_emb, dtype, quant_config, f"{prefix}.self_attn")
        sparse = (config.n_routed_experts and layer_idx >= config.first_k_dense_replace
                  and layer_idx % (getattr(config, "moe_layer_freq", 1) or 1) == 0)
        self.mlp = (DeepseekMoE(config, dtype, quant_config, f"{prefix}.mlp") if sparse else
                    DenseMLP(config.hidden_size, config.intermediate_size, dtype, quant_config, f"{prefix}.mlp"))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(hidden), hidden
        else:
            x, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, x, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DeepseekModel(DecoderStack):
    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: int, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str = "model") -> None:
        super().__init__(config)
        check_silu(config)
        check_unquantized(quant_config, "DeepSeek: the latent attention reads kv_b_proj's weight directly and the "
                                        "experts are unquantized")
        self.embed_tokens = self.vocab_embedding(config, dtype, quant_config, f"{prefix}.embed_tokens")
        theta, scaling = rope_params(config)
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, max_position, theta, scaling)
        self.layers = self.stage_modules(lambda i: DeepseekDecoderLayer(config, i, attn_backend, self.rotary_emb, dtype,
                                                                        quant_config, f"{prefix}.layers.{i}"))
        self.add_final_norm("norm", lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, dtype))


class DeepseekV2ForCausalLM(MoECausalLM):
    """``DeepseekV2ForCausalLM`` and ``DeepseekV3ForCausalLM``."""

    model_class = DeepseekModel
    # Only the dense MLPs fuse checkpoint tensors (gate | up); q_proj and friends are loaded as they are.
    stacked_params_mapping = [(".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """Drops the layers past ``num_hidden_layers`` (V3's multi-token-prediction layer)."""
        layers = self.config.num_hidden_layers
        for name, tensor in weights:
            if name.startswith("model.layers.") and int(name.split(".")[2]) >= layers:
                continue
            yield name, tensor


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    pass
