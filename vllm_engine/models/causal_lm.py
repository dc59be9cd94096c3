"""The causal-LM shell the families after Llama share: HF's ``model.`` decoder + ``lm_head`` layout, the
LM head on the last pipeline stage (the embedding itself when tied), and weight loading by HF name.

A family subclasses ``CausalLM`` with its decoder class (``model_class``: built as
``model_class(config, attn_backend, max_position, dtype, quant_config)``, exposing ``embed_tokens``,
``is_first_stage`` / ``is_last_stage`` and ``start_layer`` / ``end_layer``), and overrides
``checkpoint_weights`` to rename or split checkpoint tensors (fused q/k/v of Phi-3, experts...) and
``compute_logits`` for what follows the LM head (Gemma 2's soft cap).
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Optional, Union

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata
from vllm_engine.distributed import IntermediateTensors
from vllm_engine.layers.vocab_parallel_embedding import LogitsProcessor, ParallelLMHead
from vllm_engine.models import utils
from vllm_engine.models.utils import PPMissingLayer
from vllm_engine.quantization.base import QuantizationConfig

# (our fused parameter, the HF name of one shard, shard id): separate q/k/v and gate/up checkpoints.
LLAMA_STYLE_MAPPING: utils.StackedParamsMapping = [
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]


class CausalLM(nn.Module):
    """``model(input_ids[T] int64, positions[T] int64, kv_caches, attn_metadata) -> hidden [T, hidden]``;
    ``compute_logits(hidden[N, hidden]) -> [N, vocab]`` in the model dtype (full vocabulary). Pipeline
    stages and ``kv_caches`` as in models/llama.py."""

    model_class: ClassVar[type[nn.Module]]
    stacked_params_mapping: ClassVar[utils.StackedParamsMapping] = LLAMA_STYLE_MAPPING
    default_tie_word_embeddings: ClassVar[bool] = False

    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        max_position = max_position or getattr(config, "max_position_embeddings", None) or 2048
        self.model = self.model_class(config, attn_backend, max_position, dtype, quant_config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", self.default_tie_word_embeddings))
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

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, tensor) pairs as ``load_weights`` matches them to parameters (a family
        renames or splits tensors here). Default: as they are."""
        return weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies HF-named tensors into this rank's parameters (each its slice); returns the names
        loaded. Unknown names and wrong shapes raise ValueError; rotary tables, a tied
        ``lm_head.weight`` and other stages' tensors are skipped."""
        tied_head = self.tie_word_embeddings and isinstance(self.lm_head, ParallelLMHead)  # a last stage's own copy

        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in self.checkpoint_weights(weights):
                if self.tie_word_embeddings and name == "lm_head.weight":
                    continue
                if tied_head and name == "model.embed_tokens.weight":
                    yield "lm_head.weight", tensor
                yield name, tensor

        return utils.load_weights(self, renamed(), self.stacked_params_mapping, skip=("rotary_emb.",))

    def expected_weights(self) -> set[str]:
        """The checkpoint names ``load_weights`` must report for this rank's parameters to be complete."""
        return utils.expected_weights(self, self.stacked_params_mapping)


def soft_cap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (x unchanged when cap is None or 0), as HF computes it, in x's dtype."""
    if not cap:
        return x
    return torch.tanh(x / cap) * cap
