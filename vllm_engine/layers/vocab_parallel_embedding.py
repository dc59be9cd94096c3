"""The vocabulary split across tensor-parallel ranks: the token embedding and the LM head.

At one rank there is no split and no padding: the embedding is ``F.embedding`` and the LM head the
quant method's product (on CUDA the linear picker). At ``tp`` ranks the vocabulary is padded to a
multiple of ``64 * tp`` (vLLM's padding) and rank r holds the contiguous rows
[r * padded / tp, (r + 1) * padded / tp) (rows past the real vocabulary are zeros):

* ``VocabParallelEmbedding(ids)``: each rank looks up the ids in its range (others give zeros),
  and an all-reduce sums the ranks' rows.
* ``ParallelLMHead`` + ``LogitsProcessor``: each rank computes its slice of the logits, an
  all-gather puts the slices side by side, and the padding is dropped: the sampler sees the full
  vocabulary on every rank. (A per-rank max merged across ranks would move less; for later.)

A tied LM head is the embedding layer itself (``LogitsProcessor`` takes either).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vllm_engine.distributed import get_tp_group
from vllm_engine.layers.utils import check_shape
from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig
from vllm_engine.quantization.unquantized import UnquantizedLinearMethod

DEFAULT_VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, pad_to: int) -> int:
    return -(-vocab_size // pad_to) * pad_to


class VocabParallelEmbedding(nn.Module):
    """``embedding(ids [T] int64) -> [T, embedding_dim]``; ``weight``: this rank's
    ``[num_embeddings_per_partition, embedding_dim]`` rows, global rows
    [``vocab_start_index``, ``vocab_start_index`` + ``num_embeddings_per_partition``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: Optional[torch.dtype] = None,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE, quant_config: Optional[QuantizationConfig] = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.tp_group = get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.world_size
        self.org_vocab_size = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = (num_embeddings if self.tp_size == 1
                                      else pad_vocab_size(num_embeddings, padding_size * self.tp_size))
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        # The real (not padding) rows of this rank end here.
        self.vocab_end_index = min(self.vocab_start_index + self.num_embeddings_per_partition, num_embeddings)
        params_dtype = params_dtype or torch.get_default_dtype()
        self.quant_method: LinearMethodBase = (quant_config.get_quant_method(self, prefix)
                                               if quant_config is not None else UnquantizedLinearMethod())
        self.quant_method.create_weights(self, embedding_dim, [self.num_embeddings_per_partition], embedding_dim,
                                         self.num_embeddings_padded, params_dtype, weight_loader=self.weight_loader,
                                         checkpoint_shapes={None: (num_embeddings, embedding_dim)})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Optional[str] = None) -> None:
        """This rank's rows of the [vocab, dim] checkpoint tensor; padding rows become zeros."""
        check_shape(param, loaded_weight, shard_id)
        n = max(self.vocab_end_index - self.vocab_start_index, 0)
        param.data[:n].copy_(loaded_weight[self.vocab_start_index: self.vocab_end_index])
        if n < param.shape[0]:
            param.data[n:].zero_()

    def checkpoint_rows(self, param: nn.Parameter, shard_id: Optional[str] = None) -> Optional[tuple[int, int]]:
        """Rows [start, stop) of the checkpoint tensor ``weight_loader`` reads: this rank's vocabulary
        (None at one rank: all of it)."""
        if self.tp_size == 1:
            return None
        start = min(self.vocab_start_index, self.org_vocab_size)  # a rank of padding only reads none
        return start, max(self.vocab_end_index, start)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        out = F.embedding((input_ids - self.vocab_start_index) * mask, self.weight)
        out.masked_fill_(~mask.unsqueeze(-1), 0)
        return self.tp_group.all_reduce(out)

    def extra_repr(self) -> str:
        return (f"vocab={self.org_vocab_size} (padded {self.num_embeddings_padded}), dim={self.embedding_dim}, "
                f"rows {self.vocab_start_index}..{self.vocab_start_index + self.num_embeddings_per_partition}")


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection [vocab, hidden], split like the embedding; ``LogitsProcessor`` runs it."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead has no forward: compute logits with LogitsProcessor(lm_head, hidden)")


class LogitsProcessor:
    """``logits_processor(lm_head, hidden [N, H]) -> [N, vocab_size]`` in the model dtype, the full
    vocabulary on every rank. ``lm_head``: a ``ParallelLMHead``, or the ``VocabParallelEmbedding``
    itself for tied embeddings. (A plain object, not a module: it runs outside the CUDA graphs, on
    every step, so it skips ``nn.Module.__call__``.)"""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, lm_head: VocabParallelEmbedding, hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head.quant_method.apply(lm_head, hidden)
        if lm_head.tp_size > 1:
            logits = lm_head.tp_group.all_gather(logits, dim=-1)
            if logits.shape[-1] != self.vocab_size:
                logits = logits[..., : self.vocab_size].contiguous()
        return logits


__all__ = ["DEFAULT_VOCAB_PADDING_SIZE", "LogitsProcessor", "ParallelLMHead", "VocabParallelEmbedding",
           "pad_vocab_size"]
