"""Unquantized weights: ``weight [out, in]`` in the model dtype.

On the CPU every product is ``F.linear``. On CUDA it is a ``LinearPicker``
(layers/triton_linear.py): cuBLAS, or our Triton GEMV/GEMM where that measured faster for the
shape, and at 1-4 rows the residual add + RMSNorm before a projection, or the SiLU-and-mul before
the down projection, folded into the GEMV where that measured faster (``VLLM_ENGINE_FOLD=0``: never).
``VLLM_ENGINE_LINEAR=cublas`` turns the picker off (A/B runs). One method (one picker) serves every
layer of a model, so each shape is timed once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vllm_engine import envs
from vllm_engine.layers.activation import SiluAndMul
from vllm_engine.layers.utils import set_weight_attrs
from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig


class UnquantizedLinearMethod(LinearMethodBase):
    """``picker``: the ``LinearPicker`` on CUDA (None on the CPU or with ``VLLM_ENGINE_LINEAR=cublas``)."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.picker = None
        self.linear: Callable[..., torch.Tensor] = F.linear
        self.add_norm_linear: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None
        self.silu_mul_linear: Optional[Callable[..., torch.Tensor]] = None
        if device.type == "cuda" and envs.linear_mode() == "auto":
            try:
                from vllm_engine.layers.triton_linear import LinearPicker
            except ImportError:  # pragma: no cover - no Triton: cuBLAS for everything
                return
            self.picker = self.linear = LinearPicker()
            if envs.fold_enabled():
                self.add_norm_linear = self.picker.add_norm_linear
                self.silu_mul_linear = self.picker.silu_mul_linear

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        weight = nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
                              requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        set_weight_attrs(weight, extra_weight_attrs)
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.linear(x, layer.weight, bias)

    def apply_add_norm(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
                       bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.add_norm_linear is not None:
            return self.add_norm_linear(x, residual, norm.weight, norm.variance_epsilon, layer.weight, bias)
        h, residual = norm(x, residual)
        return self.linear(h, layer.weight, bias), residual

    def apply_act(self, layer: nn.Module, x: torch.Tensor, act_fn: nn.Module,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.silu_mul_linear is not None and type(act_fn) is SiluAndMul:
            return self.silu_mul_linear(x, layer.weight, bias)
        return self.linear(act_fn(x), layer.weight, bias)


class UnquantizedConfig(QuantizationConfig):
    """No quantization: one ``UnquantizedLinearMethod`` for every layer (made on first use, on
    ``device``, default the device the model is being built on)."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self._method: Optional[UnquantizedLinearMethod] = None

    @classmethod
    def get_name(cls) -> str:
        return "unquantized"

    @classmethod
    def from_config(cls, config: dict[str, Any], device: Optional[torch.device] = None) -> "UnquantizedConfig":
        return cls(device)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> UnquantizedLinearMethod:
        if self._method is None:
            self._method = UnquantizedLinearMethod(self.device)
        return self._method


def linear_picker(model: nn.Module) -> Any:
    """The ``LinearPicker`` the model's layers use (the first found), or None (CPU, cuBLAS mode)."""
    for module in model.modules():
        picker = getattr(getattr(module, "quant_method", None), "picker", None)
        if picker is not None:
            return picker
    return None
