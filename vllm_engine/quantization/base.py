"""The quantization seam: a config picks a method per layer; the method owns the layer's weights.

A linear layer (layers/linear.py) and the vocabulary embedding / LM head
(layers/vocab_parallel_embedding.py) call, on their ``quant_method``:

* ``create_weights(layer, ...)`` once, in the layer's constructor: register the parameters this
  format stores (an unquantized ``weight``; a packed ``qweight`` with ``scales``...), each with the
  ``weight_loader`` the layer passes in (it knows how to slice a checkpoint tensor for this rank);
* ``process_weights_after_loading(layer)`` once, after every checkpoint tensor was loaded (repack,
  transpose, compute what the kernel wants);
* ``apply(layer, x, bias)`` in every forward: ``x [T, in] -> [T, out]``. ``apply_add_norm`` and
  ``apply_act`` are the same with the residual add + RMSNorm before it, or the gated activation
  before it: by default composed, so a method folds them into its kernel only where it can.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from torch import nn


class LinearMethodBase(ABC):
    """How one kind of weight is stored and multiplied."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        """Registers ``layer``'s parameters for an output of ``sum(output_partition_sizes)`` rows
        (this rank's part of each fused shard) and ``input_size_per_partition`` columns; the whole
        layer is ``output_size`` x ``input_size``. ``extra_weight_attrs`` (``weight_loader``...) go
        on every parameter (``layers.utils.set_weight_attrs``)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [T, in]`` times the layer's weight (transposed), plus ``bias`` -> ``[T, out]`` in x.dtype."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once after loading; nothing by default."""

    def apply_add_norm(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
                       bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(apply(norm(x + residual)), x + residual)``: ``norm`` is an ``RMSNorm`` (``norm(x, residual)``
        returns both)."""
        h, residual = norm(x, residual)
        return self.apply(layer, h, bias), residual

    def apply_act(self, layer: nn.Module, x: torch.Tensor, act_fn: nn.Module,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``apply(act_fn(x))``, e.g. SiLU-and-mul of [gate | up] before a down projection."""
        return self.apply(layer, act_fn(x), bias)


class QuantizationConfig(ABC):
    """A checkpoint's quantization (HF ``config.quantization_config``): which method each layer gets."""

    @classmethod
    @abstractmethod
    def get_name(cls) -> str:
        """The ``quant_method`` name in an HF ``quantization_config`` (``"gptq"``, ``"fp8"``...)."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any], device: Optional[torch.device] = None) -> "QuantizationConfig":
        """Built from the HF ``quantization_config`` dict, for a model on ``device``."""

    @classmethod
    def dummy_config(cls) -> dict[str, Any]:
        """The ``quantization_config`` used with ``load_format="dummy"`` on a config without one
        (benchmarks: random weights in this format at a real model's shapes)."""
        return {}

    @classmethod
    def quantizes_at_load(cls) -> bool:
        """Whether ``quantization=<name>`` may be asked for an unquantized checkpoint (the weights are
        quantized while loading, as fp8 does); False: the checkpoint must be of this format."""
        return False

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        """The method for ``layer`` (named ``prefix`` in the model, e.g. ``model.layers.0.mlp.down_proj``;
        ``lm_head`` / ``model.embed_tokens`` for the vocabulary layers). A method instance may be
        shared by many layers: it keeps per-shape state (kernel choices) only."""
