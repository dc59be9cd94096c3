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

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata
from vllm_engine.distributed import IntermediateTensors, get_pp_group, get_pp_indices
from vllm_engine.layers.activation import SiluAndMul
from vllm_engine.layers.attention import Attention
from vllm_engine.layers.layernorm import RMSNorm
from vllm_engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_engine.layers.rotary import RotaryEmbedding, get_rope
from vllm_engine.layers.vocab_parallel_embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding
from vllm_engine.models import utils
from vllm_engine.models.utils import PPMissingLayer, layer_sliding_window
from vllm_engine.quantization.base import QuantizationConfig

# (our fused parameter, the HF name of one shard, shard id)
STACKED_PARAMS_MAPPING: utils.StackedParamsMapping = [
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding,
                 dtype: torch.dtype, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = _head_dim(config)
        model_type = getattr(config, "model_type", "llama")
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, num_heads, num_kv_heads,
                                          bias=attention_bias or model_type == "qwen2", params_dtype=dtype,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(num_heads * head_dim, config.hidden_size,
                                        bias=attention_bias and model_type != "qwen2", params_dtype=dtype,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        if model_type == "qwen3":
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, self.qkv_proj.num_kv_heads, rotary_emb, attn_backend,
                              layer_sliding_window(config, layer_idx), getattr(self, "q_norm", None),
                              getattr(self, "k_norm", None))

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


class LlamaModel(nn.Module):
    """This pipeline stage's layers [start_layer, end_layer); the embedding on the first stage, the
    final norm on the last (``PPMissingLayer`` stands in for what another stage holds)."""

    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: int, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str = "model") -> None:
        super().__init__()
        pp = get_pp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        self.start_layer, self.end_layer = get_pp_indices(config.num_hidden_layers, pp.rank, pp.world_size)
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype,
                                                    quant_config=quant_config, prefix=f"{prefix}.embed_tokens")
                             if self.is_first_stage else PPMissingLayer())
        self.rotary_emb = get_rope(config, _head_dim(config), max_position)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, attn_backend, self.rotary_emb, dtype, quant_config, f"{prefix}.layers.{i}")
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype) if self.is_last_stage else PPMissingLayer()
        self.stage_layers = list(self.layers)[self.start_layer: self.end_layer]  # a plain list: fast to iterate

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate_tensors: Optional[IntermediateTensors] = None,
                ) -> Union[torch.Tensor, IntermediateTensors]:
        if intermediate_tensors is None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate_tensors.hidden_states, intermediate_tensors.residual
        for i, layer in enumerate(self.stage_layers):
            hidden, residual = layer(positions, hidden, residual, kv_caches[i], attn_metadata)
        if not self.is_last_stage:
            return IntermediateTensors(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """``model(input_ids[T] int64, positions[T] int64, kv_caches, attn_metadata) -> hidden [T, hidden]``;
    ``compute_logits(hidden[N, hidden]) -> [N, vocab]`` in the model dtype (full vocabulary).

    ``kv_caches[i]``: the paged cache ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` of this
    stage's i-th layer (layer ``start_layer + i``), with this rank's KV heads. On a pipeline stage
    other than the first, ``intermediate_tensors`` is the previous stage's output (``input_ids`` is
    unused); a stage other than the last returns ``IntermediateTensors``.
    """

    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        max_position = max_position or getattr(config, "max_position_embeddings", None) or 2048
        self.model = LlamaModel(config, attn_backend, max_position, dtype, quant_config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.model.is_last_stage:
            self.lm_head = PPMissingLayer()
        elif self.tie_word_embeddings and self.model.is_first_stage:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype, quant_config=quant_config,
                                          prefix="lm_head")
            if self.tie_word_embeddings:  # a last stage's copy of the first stage's embedding
                self.lm_head.weight.checkpoint_name = "model.embed_tokens.weight"
        self.logits_processor = LogitsProcessor(config.vocab_size)

    @property
    def start_layer(self) -> int:
        return self.model.start_layer

    @property
    def end_layer(self) -> int:
        return self.model.end_layer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate_tensors: Optional[IntermediateTensors] = None,
                ) -> Union[torch.Tensor, IntermediateTensors]:
        return self.model(input_ids, positions, kv_caches, attn_metadata, intermediate_tensors)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies HF-named tensors into this rank's parameters (each its slice); returns the names
        loaded. Unknown names and wrong shapes raise ValueError; rotary tables, a tied
        ``lm_head.weight`` and other stages' tensors are skipped."""
        tied_head = self.tie_word_embeddings and isinstance(self.lm_head, ParallelLMHead)  # a last stage's own copy

        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if self.tie_word_embeddings and name == "lm_head.weight":
                    continue
                if tied_head and name == "model.embed_tokens.weight":
                    yield "lm_head.weight", tensor
                yield name, tensor

        return utils.load_weights(self, renamed(), STACKED_PARAMS_MAPPING, skip=("rotary_emb.",))

    def expected_weights(self) -> set[str]:
        """The checkpoint names ``load_weights`` must report for this rank's parameters to be complete."""
        return utils.expected_weights(self, STACKED_PARAMS_MAPPING)
