"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout), 4 and 8 bits.

Per linear module, with K input and N output features, pf = 32 // bits values per int32:

* ``qweight`` int32 [K // pf, N]: packed along K (row k of column n: word k // pf, bits (k % pf) * bits);
* ``qzeros`` int32 [G, N // pf]: zero points packed along N; the ``gptq`` checkpoint format stores
  zero - 1 (``gptq_v2``: the zero itself); symmetric checkpoints store 2**(bits - 1) (- 1);
* ``scales`` [G, N] float16; G = K // group_size (1 for ``group_size`` -1: per channel);
* ``g_idx`` int32 [K]: the group of each input row. With ``desc_act`` (act order) the rows were
  quantized in another order and the groups are not runs; without it, g_idx[k] = k // group_size.

``w[k, n] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]``; the module computes ``x @ w + bias``.

Tensor parallelism: column-parallel layers split N (qweight/scales columns, qzeros words);
row-parallel layers split K (qweight words, g_idx, and scale/zero rows; with act order the scale
and zero rows are kept whole on every rank, since a rank's rows may belong to any group).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig
from vllm_engine.quantization.unquantized import UnquantizedLinearMethod
from vllm_engine.quantization.utils import (add_param, check_divisible, derive_shapes, hf_module_names,
                                            pack_factor, unpack_int32)
from vllm_engine.quantization.wna16 import WNA16LinearMethodBase

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def check_group_size(group_size: Any, field: str) -> int:
    """-1 (per channel) or a power of two >= 16; ValueError naming ``field`` otherwise."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (
            group_size == -1 or (group_size >= 16 and group_size & (group_size - 1) == 0)):
        raise ValueError(f"{field}={group_size!r} is not supported (-1 or a power of two >= 16, e.g. 32, 64, 128).")
    return group_size


class GPTQConfig(QuantizationConfig):
    """HF ``quantization_config`` with ``quant_method: "gptq"``: ``bits``, ``group_size``, ``desc_act``,
    ``sym``, ``checkpoint_format``; optionally ``modules_in_block_to_quantize`` (only these modules
    of each decoder layer are quantized). The embedding and LM head stay unquantized."""

    def __init__(self, bits: int, group_size: int, desc_act: bool, sym: bool, checkpoint_format: str = "gptq",
                 modules_in_block_to_quantize: Optional[list[str]] = None,
                 device: Optional[torch.device] = None) -> None:
        self.bits = bits
        self.pack_factor = pack_factor(bits)
        self.group_size = group_size
        self.desc_act = desc_act
        self.sym = sym
        self.checkpoint_format = checkpoint_format
        self.modules_in_block_to_quantize = modules_in_block_to_quantize
        self.device = device
        self._linear: Optional[GPTQLinearMethod] = None
        self._unquantized: Optional[UnquantizedLinearMethod] = None

    @classmethod
    def get_name(cls) -> str:
        return "gptq"

    @classmethod
    def from_config(cls, config: dict[str, Any], device: Optional[torch.device] = None) -> "GPTQConfig":
        bits = config.get("bits", config.get("w_bit"))
        if bits not in (4, 8):
            raise ValueError(f"quantization_config.bits={bits!r} is not supported by gptq (4 or 8).")
        group_size = check_group_size(config.get("group_size", 128), "quantization_config.group_size")
        fmt = str(config.get("checkpoint_format", "gptq")).lower()
        if fmt not in CHECKPOINT_FORMATS:
            raise ValueError(f"quantization_config.checkpoint_format={fmt!r} is not supported "
                             f"({', '.join(CHECKPOINT_FORMATS)}).")
        if config.get("lm_head"):
            raise ValueError("quantization_config.lm_head=true (a quantized LM head) is not supported by gptq.")
        if config.get("dynamic"):
            raise ValueError("quantization_config.dynamic (per-module GPTQ settings) is not supported.")
        modules = config.get("modules_in_block_to_quantize")
        flat = [m for group in modules for m in (group if isinstance(group, list) else [group])] if modules else None
        return cls(bits, group_size, bool(config.get("desc_act", False)), bool(config.get("sym", True)), fmt,
                   flat, device)

    @classmethod
    def dummy_config(cls) -> dict[str, Any]:
        return {"bits": 4, "group_size": 128, "desc_act": False, "sym": True}

    def is_quantized(self, prefix: str) -> bool:
        """Whether the module(s) behind ``prefix`` are quantized; ValueError when only some of a fused
        layer's modules are."""
        if self.modules_in_block_to_quantize is None:
            return True
        names = hf_module_names(prefix)
        flags = {any(n.endswith("." + m) or n == m for m in self.modules_in_block_to_quantize) for n in names}
        if len(flags) > 1:
            raise ValueError(f"{prefix}: modules_in_block_to_quantize quantizes some of {', '.join(names)} but "
                             "not all; fused modules must be quantized alike.")
        return flags.pop()

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        from vllm_engine.layers.linear import LinearBase

        if isinstance(layer, LinearBase) and self.is_quantized(prefix):
            if self._linear is None:
                self._linear = GPTQLinearMethod(self)
            return self._linear
        if self._unquantized is None:
            self._unquantized = UnquantizedLinearMethod(self.device)
        return self._unquantized


class GPTQLinearMethod(WNA16LinearMethodBase):
    """The GPTQ tensors of one linear layer (module docstring), repacked at load for kernels/wna16.py."""

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config.device)
        self.config = config

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        cfg, pf = self.config, self.config.pack_factor
        k, n = input_size_per_partition, sum(output_partition_sizes)
        check_divisible(k, pf, f"input features per rank for {cfg.bits}-bit packing", layer)
        for size in output_partition_sizes:
            check_divisible(size, pf, f"output features of each fused part per rank for {cfg.bits}-bit qzeros", layer)
        group = cfg.group_size if cfg.group_size != -1 else input_size
        row_split = k != input_size
        # Whole scale rows on every rank: per-channel scales, or act order split across ranks.
        whole_groups = cfg.group_size == -1 or (cfg.desc_act and row_split)
        if not whole_groups:
            check_divisible(k, group, "input features per rank", layer, "quantization group_size")
        check_divisible(input_size, group, "input features", layer, "quantization group_size")
        g_full = input_size // group
        g_local = g_full if whole_groups else k // group
        group_dim = None if whole_groups else 0
        shapes = extra_weight_attrs.pop("checkpoint_shapes")
        loader = extra_weight_attrs["weight_loader"]
        add_param(layer, "qweight", (k // pf, n), torch.int32,
                  {"input_dim": 0, "output_dim": 1, "packed_dim": 0, "pack_factor": pf,
                   "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (i // pf, o))}, extra_weight_attrs)
        add_param(layer, "g_idx", (k,), torch.int32,
                  {"input_dim": 0, "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (i,)),
                   "weight_loader": same_across_shards_loader(loader)}, extra_weight_attrs)
        add_param(layer, "qzeros", (g_local, n // pf), torch.int32,
                  {"input_dim": group_dim, "output_dim": 1, "packed_dim": 1, "pack_factor": pf,
                   "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (g_full, o // pf))}, extra_weight_attrs)
        add_param(layer, "scales", (g_local, n), params_dtype,
                  {"input_dim": group_dim, "output_dim": 1,
                   "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (g_full, o))}, extra_weight_attrs)
        layer.gptq_group_size = group if not whole_groups or cfg.group_size != -1 else k

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        cfg = self.config
        q = unpack_int32(layer.qweight.data, cfg.bits, 0)
        zeros = unpack_int32(layer.qzeros.data, cfg.bits, 1)
        if cfg.checkpoint_format == "gptq":
            zeros = zeros + 1  # the v1 format stores zero - 1
        g_idx = layer.g_idx.data if cfg.desc_act else None
        self.finish(layer, q, layer.scales.data, zeros, cfg.bits, layer.gptq_group_size, g_idx, drop=("qzeros",))


def same_across_shards_loader(loader: Callable) -> Callable:
    """A loader for a parameter every shard of a fused layer has a copy of (``g_idx``): the first
    shard is loaded, the others must be equal (ValueError otherwise: act orders must agree)."""

    def load(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is None or not getattr(param, "loaded_once", False):
            loader(param, loaded_weight, shard_id) if shard_id is not None else loader(param, loaded_weight)
            param.loaded_once = True
            return
        if not torch.equal(param.data, loaded_weight.to(param.device, param.dtype)):
            raise ValueError(f"(shard {shard_id!r}) differs from the g_idx of the modules fused with it; "
                             "act-order permutations of q/k/v (gate/up) must agree")

    return load


__all__ = ["GPTQConfig", "GPTQLinearMethod", "check_group_size", "same_across_shards_loader"]
