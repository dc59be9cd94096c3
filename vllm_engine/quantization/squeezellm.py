"""SqueezeLLM checkpoints: non-uniform 4-bit weights, one lookup table of 16 values per output channel.

Per linear module (K inputs, N outputs):

* ``qweight`` int32 [K // 8, N]: 4-bit indices packed along K as GPTQ packs (row k of column n in word
  k // 8, bits (k % 8) * 4);
* ``lookup_table`` [N, 16] float16: the values the indices of each output channel stand for.

``w[k, n] = lookup_table[n, q[k, n]]``; the module computes ``x @ w + bias``. The kernels
(kernels/wna16.py, lookup-table mode) gather each tile's values from the table.
``quantization_config``: ``quant_method: "squeezellm"``, ``wbits: 4``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig
from vllm_engine.quantization.unquantized import UnquantizedLinearMethod
from vllm_engine.quantization.utils import add_param, check_divisible, derive_shapes, unpack_int32
from vllm_engine.quantization.wna16 import WNA16LinearMethodBase

BITS, PACK = 4, 8


class SqueezeLLMConfig(QuantizationConfig):
    """HF ``quantization_config`` with ``quant_method: "squeezellm"``, ``wbits`` 4; every linear layer
    of the decoder is quantized, the embedding and LM head are not."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.device = device
        self._linear: Optional[SqueezeLLMLinearMethod] = None
        self._unquantized: Optional[UnquantizedLinearMethod] = None

    @classmethod
    def get_name(cls) -> str:
        return "squeezellm"

    @classmethod
    def from_config(cls, config: dict[str, Any], device: Optional[torch.device] = None) -> "SqueezeLLMConfig":
        bits = config.get("wbits", config.get("bits"))
        if bits != BITS:
            raise ValueError(f"quantization_config.wbits={bits!r} is not supported by squeezellm (4).")
        return cls(device)

    @classmethod
    def dummy_config(cls) -> dict[str, Any]:
        return {"wbits": BITS}

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        from vllm_engine.layers.linear import LinearBase

        if isinstance(layer, LinearBase):
            if self._linear is None:
                self._linear = SqueezeLLMLinearMethod(self.device)
            return self._linear
        if self._unquantized is None:
            self._unquantized = UnquantizedLinearMethod(self.device)
        return self._unquantized


class SqueezeLLMLinearMethod(WNA16LinearMethodBase):
    """The SqueezeLLM tensors of one linear layer (module docstring), repacked at load for kernels/wna16.py."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        k, n = input_size_per_partition, sum(output_partition_sizes)
        check_divisible(k, PACK, "input features per rank for 4-bit packing", layer)
        shapes = extra_weight_attrs.pop("checkpoint_shapes")
        add_param(layer, "qweight", (k // PACK, n), torch.int32,
                  {"input_dim": 0, "output_dim": 1, "packed_dim": 0, "pack_factor": PACK,
                   "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (i // PACK, o))}, extra_weight_attrs)
        add_param(layer, "lookup_table", (n, 1 << BITS), params_dtype,
                  {"output_dim": 0, "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (o, 1 << BITS))},
                  extra_weight_attrs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q = unpack_int32(layer.qweight.data, BITS, 0)
        self.finish(layer, q, None, None, BITS, q.shape[0], None, drop=(), lut=layer.lookup_table.data)


__all__ = ["SqueezeLLMConfig", "SqueezeLLMLinearMethod"]
