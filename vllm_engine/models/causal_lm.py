"""The causal-LM shell every family shares: the decoder under HF's name for it (``model``,
``transformer``, ``gpt_neox``), the LM head on the last pipeline stage (the embedding itself when
tied), and weight loading by HF name.

A family subclasses ``CausalLM`` with its decoder class (``model_class``: a ``utils.DecoderStack``
built as ``model_class(config, attn_backend, max_position, dtype, quant_config, prefix)``, exposing
its embedding as attribute ``embed_name``), the checkpoint's names (``base_model_prefix``,
``lm_head_name``), and overrides ``checkpoint_weights`` to rename, transpose or split checkpoint
tensors (GPT-2's Conv1D, GPT-NeoX's interleaved q/k/v, experts...) and ``compute_logits`` for what
follows the LM head (Gemma 2's cap).
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
    ``compute_logits(hidden[N, hidden]) -> [N, vocab]`` in the model dtype (full vocabulary).

    ``kv_caches[i]``: the paged cache ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` of this
    stage's i-th layer (layer ``start_layer + i``), with this rank's KV heads (or the layout the
    family's attention declares). On a pipeline stage other than the first, ``intermediate_tensors``
    is the previous stage's output (``input_ids`` is unused); a stage other than the last returns
    ``IntermediateTensors``.
    """

    model_class: ClassVar[type[nn.Module]]
    stacked_params_mapping: ClassVar[utils.StackedParamsMapping] = LLAMA_STYLE_MAPPING
    default_tie_word_embeddings: ClassVar[bool] = False
    base_model_prefix: ClassVar[str] = "model"
    lm_head_name: ClassVar[str] = "lm_head"
    embed_name: ClassVar[str] = "embed_tokens"
    base_model: nn.Module  # the decoder (base_model_prefix), a plain attribute
    head: nn.Module  # the LM head (lm_head_name), a plain attribute

    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        max_position = max_position or getattr(config, "max_position_embeddings", None) or 2048
        base = self.model_class(config, attn_backend, max_position, dtype, quant_config, self.base_model_prefix)
        self.add_module(self.base_model_prefix, base)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", self.default_tie_word_embeddings))
        self.embed_checkpoint_name = f"{self.base_model_prefix}.{self.embed_name}.weight"
        if not base.is_last_stage:
            lm_head: nn.Module = PPMissingLayer()
        elif self.tie_word_embeddings and base.is_first_stage:
            lm_head = getattr(base, self.embed_name)
        else:
            lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype, quant_config=quant_config,
                                     prefix=self.lm_head_name)
            if self.tie_word_embeddings:  # a last stage's copy of the first stage's embedding
                lm_head.weight.checkpoint_name = self.embed_checkpoint_name
        self.add_module(self.lm_head_name, lm_head)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        # Plain attributes under names every family shares (registered above under the checkpoint's):
        # forward and compute_logits reach them without a Module lookup each step.
        object.__setattr__(self, "base_model", base)
        object.__setattr__(self, "head", lm_head)  # a ParallelLMHead, the tied embedding, or a placeholder

    @property
    def start_layer(self) -> int:
        return self.base_model.start_layer

    @property
    def end_layer(self) -> int:
        return self.base_model.end_layer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate_tensors: Optional[IntermediateTensors] = None,
                ) -> Union[torch.Tensor, IntermediateTensors]:
        return self.base_model(input_ids, positions, kv_caches, attn_metadata, intermediate_tensors)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.head, hidden)

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, tensor) pairs as ``load_weights`` matches them to parameters (a family
        renames or splits tensors here). Default: as they are."""
        return weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies HF-named tensors into this rank's parameters (each its slice); returns the names
        loaded. Unknown names and wrong shapes raise ValueError; rotary tables, a tied
        ``lm_head.weight`` and other stages' tensors are skipped."""
        tied_head = self.tie_word_embeddings and isinstance(self.head, ParallelLMHead)  # a last stage's own copy
        head_weight = f"{self.lm_head_name}.weight"

        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in self.checkpoint_weights(weights):
                if self.tie_word_embeddings and name == head_weight:
                    continue
                if tied_head and name == self.embed_checkpoint_name:
                    yield head_weight, tensor
                yield name, tensor

        return utils.load_weights(self, renamed(), self.stacked_params_mapping, skip=("rotary_emb.",))

    def checkpoint_row_ranges(self) -> dict[str, tuple[int, int]]:
        """{checkpoint name: rows this rank's loaders read} (``utils.checkpoint_row_ranges``), so a
        loader may read only those; empty for a family that renames, regroups or loads the
        checkpoint's tensors its own way (its rows are not the file's)."""
        own = (type(self).checkpoint_weights is CausalLM.checkpoint_weights
               and type(self).load_weights is CausalLM.load_weights)
        return utils.checkpoint_row_ranges(self, self.stacked_params_mapping) if own else {}

    def expected_weights(self) -> set[str]:
        """The checkpoint names ``load_weights`` must report for this rank's parameters to be complete."""
        return utils.expected_weights(self, self.stacked_params_mapping)


def soft_cap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (x unchanged when cap is None or 0), as HF computes it, in x's dtype."""
    if not cap:
        return x
    return torch.tanh(x / cap) * cap
