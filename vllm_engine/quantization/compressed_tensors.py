"""compressed-tensors checkpoints (what llm-compressor writes): pack-quantized W4A16 / W8A16, and
float-quantized FP8 W8A8 (fp8.py's method: ``weight`` e4m3, ``weight_scale`` per channel [N, 1] or per
tensor, activations dynamic per token or static with ``input_scale``).

``quantization_config``: ``config_groups`` (each: ``targets`` — ``"Linear"``, module names or
``"re:<regex>"`` — and a ``weights`` scheme), ``ignore`` (names / regexes left unquantized), ``format``
(``"pack-quantized"`` or ``"float-quantized"``, or per group). A pack-quantized scheme: ``type: int``,
``num_bits`` 4 or 8, ``strategy`` ``"group"`` (``group_size``) or ``"channel"``, ``symmetric`` or not,
no activation quantization.

Per linear module (K inputs, N outputs, pf = 32 // bits; the torch [N, K] weight orientation):

* ``weight_packed`` int32 [N, K // pf]: value k of row n in word k // pf, bits (k % pf) * bits,
  stored as q + 2**(bits - 1) for the signed q in [-2**(bits - 1), 2**(bits - 1));
* ``weight_scale`` [N, G] (G = K // group_size; 1 per channel);
* ``weight_zero_point`` int32 [N // pf, G] (asymmetric only): the signed zero points packed along N,
  with the same offset;
* ``weight_shape`` [2]: (N, K);
* ``weight_g_idx`` int32 [K] (``actorder: "group"``): the group of each input column (act order, as
  GPTQ's ``g_idx``); without it ``g = k // group_size``.

``w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig
from vllm_engine.quantization.fp8 import Fp8LinearMethod
from vllm_engine.quantization.gptq import check_group_size, same_across_shards_loader
from vllm_engine.quantization.unquantized import UnquantizedLinearMethod
from vllm_engine.quantization.utils import (add_param, check_divisible, derive_shapes, hf_module_names,
                                            pack_factor, unpack_int32)
from vllm_engine.quantization.wna16 import WNA16LinearMethodBase

PACK_QUANTIZED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"


def _matches(name: str, pattern: str) -> bool:
    """A target / ignore entry: ``re:<regex>`` (matched against the whole name), else the module name
    itself or its last component(s) (``lm_head``, ``mlp.down_proj``)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


class WeightScheme:
    """One config group's scheme, checked. ``kind`` ``"wna16"``: pack-quantized integer weights
    (``bits``, ``group_size`` -1 per channel, ``symmetric``); ``"fp8"``: float-quantized FP8 W8A8
    (``per_channel`` weight scales, ``static_activations``)."""

    def __init__(self, group_name: str, group: dict[str, Any], default_format: Optional[str]) -> None:
        where = f"quantization_config.config_groups.{group_name}"
        fmt = group.get("format") or default_format
        self.targets = list(group.get("targets") or [])
        weights = group.get("weights") or {}
        if weights.get("dynamic"):
            raise ValueError(f"{where}.weights.dynamic=true is not supported for weights.")
        if fmt == PACK_QUANTIZED:
            self._check_wna16(where, group, weights)
        elif fmt == FLOAT_QUANTIZED:
            self._check_fp8(where, group, weights)
        else:
            raise ValueError(f"{where}: format {fmt!r} is not supported (supported: {PACK_QUANTIZED!r}, integer "
                             f"weight-only W4A16 / W8A16; {FLOAT_QUANTIZED!r}, FP8 W8A8).")

    def _check_wna16(self, where: str, group: dict[str, Any], weights: dict[str, Any]) -> None:
        self.kind = "wna16"
        if group.get("input_activations") or group.get("output_activations"):
            raise ValueError(f"{where}.input_activations: activation quantization is not supported with "
                             f"{PACK_QUANTIZED} (weight-only schemes only).")
        if weights.get("type", "int") != "int":
            raise ValueError(f"{where}.weights.type={weights.get('type')!r} is not supported (int).")
        self.bits = weights.get("num_bits")
        if self.bits not in (4, 8):
            raise ValueError(f"{where}.weights.num_bits={self.bits!r} is not supported (4 or 8).")
        strategy = weights.get("strategy")
        if strategy == "group":
            self.group_size = check_group_size(weights.get("group_size"), f"{where}.weights.group_size")
        elif strategy == "channel":
            self.group_size = -1
        else:
            raise ValueError(f"{where}.weights.strategy={strategy!r} is not supported (group or channel).")
        actorder = weights.get("actorder")
        if actorder not in (None, False, "weight", "group"):
            raise ValueError(f"{where}.weights.actorder={actorder!r} is not supported (none, 'weight', or 'group': "
                             "a weight_g_idx per module).")
        self.g_idx = actorder == "group" and strategy == "group"  # groups by weight_g_idx, not runs
        self.symmetric = bool(weights.get("symmetric", True))

    def _check_fp8(self, where: str, group: dict[str, Any], weights: dict[str, Any]) -> None:
        self.kind = "fp8"
        if (weights.get("type"), weights.get("num_bits")) != ("float", 8):
            raise ValueError(f"{where}.weights: type={weights.get('type')!r} num_bits={weights.get('num_bits')!r} "
                             f"is not supported with {FLOAT_QUANTIZED} (float, 8: FP8 e4m3).")
        if weights.get("strategy") not in ("channel", "tensor"):
            raise ValueError(f"{where}.weights.strategy={weights.get('strategy')!r} is not supported with FP8 "
                             "(channel or tensor).")
        if not weights.get("symmetric", True):
            raise ValueError(f"{where}.weights.symmetric=false is not supported with FP8.")
        self.per_channel = weights["strategy"] == "channel"
        acts = group.get("input_activations") or {}
        if (acts.get("type"), acts.get("num_bits")) != ("float", 8):
            raise ValueError(f"{where}.input_activations must be FP8 (type float, num_bits 8) with FP8 weights.")
        if acts.get("dynamic") and acts.get("strategy") == "token":
            self.static_activations = False
        elif not acts.get("dynamic") and acts.get("strategy") == "tensor":
            self.static_activations = True
        else:
            raise ValueError(f"{where}.input_activations: strategy={acts.get('strategy')!r} dynamic="
                             f"{acts.get('dynamic')!r} is not supported (token and dynamic, or tensor and static).")


def check_kv_cache_scheme(scheme: Optional[dict[str, Any]]) -> None:
    """A ``kv_cache_scheme`` is served as an fp8 KV cache with the checkpoint's per-layer
    ``self_attn.k_scale`` / ``v_scale`` (with ``kv_cache_dtype="fp8"``): only symmetric 8-bit float
    per-tensor static scales are; anything else is refused naming the setting."""
    if not scheme:
        return
    wanted = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    for key, value in wanted.items():
        got = scheme.get(key, value if key in ("strategy", "dynamic") else None)
        if got != value:
            raise ValueError(f"quantization_config.kv_cache_scheme.{key}={got!r} is not supported: only an fp8 "
                             "KV cache with one static scale per layer (num_bits 8, type float, strategy tensor, "
                             "symmetric).")


class CompressedTensorsConfig(QuantizationConfig):
    """``quant_method: "compressed-tensors"``: per module, the first config group whose targets match
    (``"Linear"`` matches every linear layer) unless ``ignore`` names it; the embedding and LM head
    stay unquantized (ValueError if a group targets the LM head without ignoring it)."""

    def __init__(self, schemes: list[WeightScheme], ignore: list[str], device: Optional[torch.device] = None) -> None:
        self.schemes = schemes
        self.ignore = ignore
        self.device = device
        self._methods: dict[int, CompressedTensorsWNA16Method] = {}
        self._unquantized: Optional[UnquantizedLinearMethod] = None

    @classmethod
    def get_name(cls) -> str:
        return "compressed-tensors"

    @classmethod
    def from_config(cls, config: dict[str, Any], device: Optional[torch.device] = None) -> "CompressedTensorsConfig":
        groups = config.get("config_groups") or {}
        if not groups:
            raise ValueError("quantization_config.config_groups is empty: nothing to dequantize.")
        check_kv_cache_scheme(config.get("kv_cache_scheme"))
        if config.get("sparsity_config"):
            raise ValueError("quantization_config.sparsity_config (sparse weights) is not supported.")
        schemes = [WeightScheme(name, g, config.get("format")) for name, g in groups.items()]
        return cls(schemes, list(config.get("ignore") or []), device)

    @classmethod
    def dummy_config(cls) -> dict[str, Any]:
        """W4A16, groups of 128, symmetric (llm-compressor's W4A16 preset)."""
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
        return {"format": PACK_QUANTIZED, "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}

    def scheme_for(self, prefix: str, is_linear: bool) -> Optional[WeightScheme]:
        """The scheme of the module(s) behind ``prefix`` (None: unquantized); fused modules must agree."""
        found = set()
        for name in hf_module_names(prefix):
            scheme = None
            if not any(_matches(name, p) for p in self.ignore):
                scheme = next((s for s in self.schemes for t in s.targets
                               if (t == "Linear" and is_linear) or _matches(name, t)), None)
            found.add(id(scheme) if scheme is not None else None)
        if len(found) > 1:
            raise ValueError(f"{prefix}: the modules fused in it ({', '.join(hf_module_names(prefix))}) have "
                             "different quantization schemes (config_groups / ignore).")
        key = found.pop()
        return next(s for s in self.schemes if id(s) == key) if key is not None else None

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        from vllm_engine.layers.linear import LinearBase

        is_linear = isinstance(layer, LinearBase)
        scheme = self.scheme_for(prefix, is_linear) if is_linear or prefix == "lm_head" else None
        if scheme is not None and not is_linear:
            raise ValueError(f"{prefix}: a quantized LM head is not supported (add it to quantization_config.ignore).")
        if scheme is None:
            if self._unquantized is None:
                self._unquantized = UnquantizedLinearMethod(self.device)
            return self._unquantized
        if id(scheme) not in self._methods:
            self._methods[id(scheme)] = (
                Fp8LinearMethod(True, scheme.static_activations, scheme.per_channel, self.device)
                if scheme.kind == "fp8" else CompressedTensorsWNA16Method(scheme, self.device))
        return self._methods[id(scheme)]


class CompressedTensorsWNA16Method(WNA16LinearMethodBase):
    """A pack-quantized W4A16 / W8A16 linear layer (module docstring), repacked at load for kernels/wna16.py."""

    def __init__(self, scheme: WeightScheme, device: Optional[torch.device] = None) -> None:
        super().__init__(device)
        self.scheme = scheme

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        s, pf = self.scheme, pack_factor(self.scheme.bits)
        k, n = input_size_per_partition, sum(output_partition_sizes)
        check_divisible(k, pf, f"input features per rank for {s.bits}-bit packing", layer)
        per_channel = s.group_size == -1
        # Whole scale columns on every rank: per channel, or act order split across ranks.
        whole_groups = per_channel or (s.g_idx and k != input_size)
        if not whole_groups:
            check_divisible(k, s.group_size, "input features per rank", layer, "quantization group_size")
        if not per_channel:
            check_divisible(input_size, s.group_size, "input features", layer, "quantization group_size")
        g_full = 1 if per_channel else input_size // s.group_size
        g_local = g_full if whole_groups else k // s.group_size
        group_dim = None if whole_groups else 1
        shapes = extra_weight_attrs.pop("checkpoint_shapes")
        if s.g_idx:
            add_param(layer, "weight_g_idx", (k,), torch.int32,
                      {"input_dim": 0, "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (i,)),
                       "weight_loader": same_across_shards_loader(extra_weight_attrs["weight_loader"])},
                      extra_weight_attrs)
        add_param(layer, "weight_packed", (n, k // pf), torch.int32,
                  {"input_dim": 1, "output_dim": 0, "packed_dim": 1, "pack_factor": pf,
                   "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (o, i // pf))}, extra_weight_attrs)
        add_param(layer, "weight_scale", (n, g_local), params_dtype,
                  {"input_dim": group_dim, "output_dim": 0,
                   "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (o, g_full))}, extra_weight_attrs)
        if not s.symmetric:
            for size in output_partition_sizes:
                check_divisible(size, pf, f"output features of each fused part per rank for {s.bits}-bit zero "
                                "points", layer)
            add_param(layer, "weight_zero_point", (n // pf, g_local), torch.int32,
                      {"input_dim": group_dim, "output_dim": 0, "packed_dim": 0, "pack_factor": pf,
                       "checkpoint_shapes": derive_shapes(shapes, lambda o, i: (o // pf, g_full))}, extra_weight_attrs)
        add_param(layer, "weight_shape", (2,), torch.int64,
                  {"checkpoint_shapes": derive_shapes(shapes, lambda o, i: (2,)),
                   "weight_loader": _shape_checker(shapes)}, extra_weight_attrs)
        layer.ct_group_size = k if per_channel else s.group_size

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        bits = self.scheme.bits
        q = unpack_int32(layer.weight_packed.data, bits, 1).t()
        zp = getattr(layer, "weight_zero_point", None)
        zeros = unpack_int32(zp.data, bits, 0).t() if zp is not None else None
        scales = layer.weight_scale.data.t()
        g_idx = layer.weight_g_idx.data if self.scheme.g_idx else None
        self.finish(layer, q, scales, zeros, bits, layer.ct_group_size, g_idx,
                    drop=("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"))


def _shape_checker(shapes: dict[Any, tuple[int, int]]):
    """The loader of ``weight_shape``: it must be the (out, in) of the module it belongs to."""

    def load(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        want = shapes[shard_id]
        if loaded_weight.numel() != 2 or tuple(int(v) for v in loaded_weight.flatten()) != tuple(want):
            raise ValueError(f"holds {loaded_weight.tolist()}, expected the module's shape {list(want)}")

    return load


__all__ = ["CompressedTensorsConfig", "CompressedTensorsWNA16Method", "WeightScheme"]
