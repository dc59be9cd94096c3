"""GGUF weights kept quantized (``quantization="gguf"`` with a GGUF file): the linear layers' blocks are
decoded at load into integers with one scale and one min per group, ``w = q * scale + min``, and
repacked into the shared integer layout (kernels/wna16.py), so the kernels dequantize in the tile
and no bf16 copy of the weights exists. Without it GGUF files are dequantized at load
(model_loader/gguf_loader.py), which stays the default.

Block formats (model_loader/gguf_loader.py describes their bytes) as groups:

| type | group | bits kept | scale | min |
|---|---|---|---|---|
| Q4_0 | 32 | 4 | d | -8 d |
| Q4_1 | 32 | 4 | d | m |
| Q8_0 | 32 | 8 (q + 128) | d | -128 d |
| Q4_K | 32 (8 per super-block) | 4 | d * sc | -dmin * m |
| Q5_K | 32 | 8 (5-bit values) | d * sc | -dmin * m |
| Q6_K | 16 | 8 (6-bit values) | d * sc | -32 d * sc |

A fused layer whose parts have different types (Q4_K q/k with a Q6_K v) keeps the larger width and the
smaller group for all of them (a part's scales repeat over the smaller groups). The embedding, the LM
head and unquantized (F16/F32) tensors are dequantized at load as before.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from vllm_engine.layers.utils import set_weight_attrs
from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig
from vllm_engine.quantization.unquantized import UnquantizedLinearMethod
from vllm_engine.quantization.utils import derive_shapes, hf_module_names, layer_name
from vllm_engine.quantization.wna16 import WNA16LinearMethodBase


def _f16(raw: torch.Tensor) -> torch.Tensor:
    # The block helpers of model_loader/gguf_loader.py, imported when first used: that package
    # imports this one while it loads.
    from vllm_engine.model_loader import gguf_loader

    return gguf_loader._f16(raw)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    from vllm_engine.model_loader import gguf_loader

    return gguf_loader._k_nibbles(qs)


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from vllm_engine.model_loader import gguf_loader

    return gguf_loader._k_scales_mins(s)


def _nib(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] values: low nibbles are values 0..15, high nibbles 16..31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _q4_0(b):
    d = _f16(b[:, :2])[:, None]
    return _nib(b[:, 2:18]), d, -8.0 * d


def _q4_1(b):
    return _nib(b[:, 4:20]), _f16(b[:, :2])[:, None], _f16(b[:, 2:4])[:, None]


def _q8_0(b):
    d = _f16(b[:, :2])[:, None]
    q = (b[:, 2:34].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return q, d, -128.0 * d


def _k_scale_min(b):
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, m = _k_scales_mins(b[:, 4:16])
    return d * sc, -(dmin * m)


def _q4_k(b):
    s, m = _k_scale_min(b)
    return _k_nibbles(b[:, 16:144]).reshape(-1, 256), s, m


def _q5_k(b):
    s, m = _k_scale_min(b)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)[None, :, None]
    high = ((b[:, 16:48][:, None, :] >> shifts) & 1) << 4
    return (_k_nibbles(b[:, 48:176]) | high).reshape(-1, 256), s, m


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)[None, None, :, None]
    q = torch.cat((ql & 0x0F, ql >> 4), dim=2) | (((qh >> shifts) & 3) << 4)  # [n, 2, 4, 32]: values 0..63
    s = _f16(b[:, 208:210])[:, None] * b[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    return q.reshape(n, 256), s, -32.0 * s


# type -> (values per block, bytes per block, group size, bits kept, decoder: blocks -> (q, scales, mins))
GGUF_BLOCKS: dict[str, tuple[int, int, int, int, Callable]] = {
    "Q4_0": (32, 18, 32, 4, _q4_0),
    "Q4_1": (32, 20, 32, 4, _q4_1),
    "Q8_0": (32, 34, 32, 8, _q8_0),
    "Q4_K": (256, 144, 32, 4, _q4_k),
    "Q5_K": (256, 176, 32, 8, _q5_k),
    "Q6_K": (256, 210, 16, 8, _q6_k),
}


def decode_blocks(raw: torch.Tensor, type_name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """A GGUF tensor's bytes (rows of blocks) -> (q [N, K] uint8, scales [N, K / group] float32,
    mins [N, K / group] float32) with ``w = q * scale + min``."""
    block_values, block_bytes, group, _, decode = GGUF_BLOCKS[type_name]
    n, k = shape
    q, s, m = decode(raw.reshape(-1, block_bytes))
    return q.reshape(n, k), s.float().reshape(n, k // group), m.float().reshape(n, k // group)


# The GGUF architectures whose linear layers may keep their blocks (their tensors map one to one onto
# our layers' weights); the others' tensors are cut, transposed or regrouped at load (gguf_archs.py).
KEPT_QUANTIZED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


class GGUFConfig(QuantizationConfig):
    """``tensor_types``: {HF weight name: GGUF type} of the linear weights kept quantized."""

    def __init__(self, tensor_types: dict[str, str], device: Optional[torch.device] = None) -> None:
        self.tensor_types = dict(tensor_types)
        self.device = device
        self._methods: dict[tuple[int, int], GGUFLinearMethod] = {}
        self._unquantized: Optional[UnquantizedLinearMethod] = None

    @classmethod
    def get_name(cls) -> str:
        return "gguf"

    @classmethod
    def from_config(cls, config: dict[str, Any], device: Optional[torch.device] = None) -> "GGUFConfig":
        if "tensor_types" not in config:
            raise ValueError("quantization='gguf' needs a GGUF file (its tensors' types).")
        return cls(config["tensor_types"], device)

    @classmethod
    def from_gguf_file(cls, path: str, device: Optional[torch.device] = None) -> "GGUFConfig":
        """The linear weights of a GGUF file whose type is in ``GGUF_BLOCKS``, by HF name."""
        from vllm_engine.model_loader.gguf_loader import hf_name, open_gguf

        reader = open_gguf(path)
        arch = reader.metadata.get("general.architecture")
        if arch not in KEPT_QUANTIZED_ARCHS or reader.metadata.get(f"{arch}.expert_count"):
            raise ValueError(f"quantization='gguf' (blocks kept quantized) serves {', '.join(KEPT_QUANTIZED_ARCHS)} "
                             f"GGUF files without experts; this one is {arch!r}: leave quantization unset (the "
                             "weights are dequantized at load).")
        types = {}
        for t in reader.tensors:
            name = hf_name(t.name, arch)
            linear = name is not None and name.startswith("model.layers.") and name.endswith("_proj.weight")
            if linear and t.type_name in GGUF_BLOCKS:
                types[name] = t.type_name
        return cls(types, device)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        from vllm_engine.layers.linear import LinearBase

        types = [self.tensor_types.get(f"{n}.weight") for n in hf_module_names(prefix)]
        if isinstance(layer, LinearBase) and any(types):
            if not all(types):
                raise ValueError(f"{prefix}: some of its fused GGUF tensors are quantized and some not ({types}); "
                                 "load it with quantization unset (dequantized).")
            key = (max(GGUF_BLOCKS[t][3] for t in types), min(GGUF_BLOCKS[t][2] for t in types))
            if key not in self._methods:
                self._methods[key] = GGUFLinearMethod(*key, device=self.device)
            return self._methods[key]
        if self._unquantized is None:
            self._unquantized = UnquantizedLinearMethod(self.device)
        return self._unquantized


class GGUFLinearMethod(WNA16LinearMethodBase):
    """Loads a layer's GGUF blocks (``weight``: the raw bytes, ``gguf_type`` set on the tensor by the
    loader) as ``bits``-bit integers with scales and mins per ``group_size`` inputs."""

    def __init__(self, bits: int, group_size: int, device: Optional[torch.device] = None) -> None:
        super().__init__(device)
        self.bits, self.group_size = bits, group_size

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        k, n = input_size_per_partition, sum(output_partition_sizes)
        if k % self.group_size:
            raise ValueError(f"{layer_name(layer)}: input features per rank ({k}) must be a multiple of the GGUF "
                             f"block group ({self.group_size}).")
        shapes = extra_weight_attrs["checkpoint_shapes"]
        layer_loader = extra_weight_attrs["weight_loader"]
        weight = nn.Parameter(torch.empty(n, k, dtype=torch.uint8), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, "checkpoint_shapes": shapes,
                                  "weight_loader": self._block_loader(layer, layer_loader)})
        layer.register_parameter("weight", weight)
        group_shapes = derive_shapes(shapes, lambda o, i: (o, i // self.group_size))
        for name in ("gguf_scales", "gguf_mins"):
            buf = torch.empty(n, k // self.group_size, dtype=torch.float32)
            set_weight_attrs(buf, {"input_dim": 1, "output_dim": 0, "checkpoint_shapes": group_shapes})
            layer.register_buffer(name, buf, persistent=False)

    def _block_loader(self, layer: nn.Module, layer_loader: Callable) -> Callable:
        def load(param: nn.Parameter, raw: torch.Tensor, shard_id: Any = None) -> None:
            type_name = getattr(raw, "gguf_type", None)
            shape = getattr(raw, "gguf_shape", None)
            if type_name not in GGUF_BLOCKS or shape is None:
                raise ValueError(f"is not a quantized GGUF tensor the gguf method keeps (type {type_name})")
            q, s, m = decode_blocks(raw, type_name, shape)
            repeat = GGUF_BLOCKS[type_name][2] // self.group_size
            if repeat > 1:  # a wider part's groups over the layer's smaller ones
                s, m = s.repeat_interleave(repeat, dim=1), m.repeat_interleave(repeat, dim=1)
            args = () if shard_id is None else (shard_id,)
            layer_loader(param, q, *args)
            layer_loader(layer.gguf_scales, s, *args)
            layer_loader(layer.gguf_mins, m, *args)

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scales, mins = layer.weight.data.t(), layer.gguf_scales.t(), layer.gguf_mins.t()
        del layer._buffers["gguf_scales"], layer._buffers["gguf_mins"]
        self.finish(layer, q, scales, None, self.bits, self.group_size, None, drop=("weight",), mins=mins)


__all__ = ["GGUFConfig", "GGUFLinearMethod", "GGUF_BLOCKS", "decode_blocks"]
