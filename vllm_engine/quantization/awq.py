"""AWQ checkpoints (AutoAWQ's GEMM layout), 4 bits.

Per linear module, K inputs, N outputs, G = K // group_size:

* ``qweight`` int32 [K, N // 8]: packed along N, eight output columns per word in AutoAWQ's
  interleaved order: bits [4i, 4i + 4) of word j hold column ``8j + AWQ_ORDER[i]``
  (``AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7``);
* ``qzeros`` int32 [G, N // 8]: the zero points, packed the same way (no offset);
* ``scales`` [G, N] float16.

``w[k, n] = (q[k, n] - zero[k // group_size, n]) * scale[k // group_size, n]``; the module computes
``x @ w + bias``. At load the columns are put in natural order and repacked along K for the shared
kernels (kernels/wna16.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig
from vllm_engine.quantization.gptq import check_group_size
from vllm_engine.quantization.unquantized import UnquantizedLinearMethod
from vllm_engine.quantization.utils import add_param, check_divisible, derive_shapes, hf_module_names, unpack_int32
from vllm_engine.quantization.wna16 import WNA16LinearMethodBase

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
BITS, PACK = 4, 8


def awq_natural_columns(packed_values: torch.Tensor) -> torch.Tensor:
    """Values unpacked in word order [..., N] (``unpack_int32`` along N) -> columns in natural order."""
    n = packed_values.shape[-1]
    slot_of_column = torch.tensor([AWQ_ORDER.index(c) for c in range(PACK)], device=packed_values.device)
    cols = torch.arange(n, device=packed_values.device)
    return packed_values[..., (cols // PACK) * PACK + slot_of_column[cols % PACK]]


class AWQConfig(QuantizationConfig):
    """HF ``quantization_config`` with ``quant_method: "awq"``: ``bits`` (``w_bit``) 4, ``group_size``
    (``q_group_size``), ``zero_point`` true, ``version`` ``"gemm"``; ``modules_to_not_convert`` stay
    unquantized, as do the embedding and LM head."""

    def __init__(self, group_size: int, modules_to_not_convert: Optional[list[str]] = None,
                 device: Optional[torch.device] = None) -> None:
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.device = device
        self._linear: Optional[AWQLinearMethod] = None
        self._unquantized: Optional[UnquantizedLinearMethod] = None

    @classmethod
    def get_name(cls) -> str:
        return "awq"

    @classmethod
    def from_config(cls, config: dict[str, Any], device: Optional[torch.device] = None) -> "AWQConfig":
        bits = config.get("bits", config.get("w_bit"))
        if bits != BITS:
            raise ValueError(f"quantization_config.bits={bits!r} is not supported by awq (4).")
        group_size = check_group_size(config.get("group_size", config.get("q_group_size", 128)),
                                      "quantization_config.group_size")
        if not config.get("zero_point", True):
            raise ValueError("quantization_config.zero_point=false is not supported by awq (AutoAWQ's GEMM "
                             "checkpoints have zero points).")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version={version!r} is not supported by awq (the 'gemm' "
                             "layout).")
        return cls(group_size, config.get("modules_to_not_convert"), device)

    @classmethod
    def dummy_config(cls) -> dict[str, Any]:
        return {"bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}

    def is_quantized(self, prefix: str) -> bool:
        names = hf_module_names(prefix)
        skipped = {any(m in n for m in self.modules_to_not_convert) for n in names}  # AutoAWQ: substrings
        if len(skipped) > 1:
            raise ValueError(f"{prefix}: modules_to_not_convert leaves some of {', '.join(names)} unquantized but "
                             "not all; fused modules must be quantized alike.")
        return not skipped.pop()

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        from vllm_engine.layers.linear import LinearBase

        if isinstance(layer, LinearBase) and self.is_quantized(prefix):
            if self._linear is None:
                self._linear = AWQLinearMethod(self)
            return self._linear
        if self._unquantized is None:
            self._unquantized = UnquantizedLinearMethod(self.device)
        return self._unquantized


class AWQLinearMethod(WNA16LinearMethodBase):
    """The AWQ tensors of one linear layer (module docstring), repacked at load for kernels/wna16.py."""

    def __init__(self, config: AWQConfig) -> None:
        super().__init__(config.device)
        self.config = config

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        k, n = input_size_per_partition, sum(output_partition_sizes)
        for size in output_partition_sizes:
            check_divisible(size, PACK, "output features of each fused part per rank (AWQ packs 8 per word)", layer)
        per_channel = self.config.group_size == -1
        group = k if per_channel else self.config.group_size  # per channel: one row, the same on every rank
        if not per_channel:
            check_divisible(k, group, "input features per rank", layer, "quantization group_size")
        g_full, g_local = (1, 1) if per_channel else (input_size // group, k // group)
        group_dim = None if per_channel else 0
        shapes = extra_weight_attrs.pop("checkpoint_shapes")
        packed = {"output_dim": 1, "packed_dim": 1, "pack_factor": PACK}
        add_param(layer, "qweight", (k, n // PACK), torch.int32,
                  {"input_dim": 0, **packed, "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (i, o // PACK))},
                  extra_weight_attrs)
        add_param(layer, "qzeros", (g_local, n // PACK), torch.int32,
                  {"input_dim": group_dim, **packed,
                   "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (g_full, o // PACK))}, extra_weight_attrs)
        add_param(layer, "scales", (g_local, n), params_dtype,
                  {"input_dim": group_dim, "output_dim": 1,
                   "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (g_full, o))}, extra_weight_attrs)
        layer.awq_group_size = group

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q = awq_natural_columns(unpack_int32(layer.qweight.data, BITS, 1))
        zeros = awq_natural_columns(unpack_int32(layer.qzeros.data, BITS, 1))
        self.finish(layer, q, layer.scales.data, zeros, BITS, layer.awq_group_size, None, drop=("qzeros",))


__all__ = ["AWQ_ORDER", "AWQConfig", "AWQLinearMethod", "awq_natural_columns"]
