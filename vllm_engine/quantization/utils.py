"""What the quantization methods share: int32 bit packing, parameter registration, and the HF names
behind a layer's (possibly fused) prefix.

Packing (GPTQ, AWQ after reordering, compressed-tensors): ``32 // bits`` unsigned values per int32,
value ``i`` of a word in bits ``[i * bits, (i + 1) * bits)``; consecutive values along the packed
dimension go into one word. Only 4 and 8 bits (whole values per word) are handled.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from vllm_engine.layers.utils import set_weight_attrs

SUPPORTED_BITS = (4, 8)

# Our fused layer name -> the HF module names it stacks (models/causal_lm.py LLAMA_STYLE_MAPPING): a
# checkpoint's per-module settings (ignore lists, targets) name the HF modules.
FUSED_MODULES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def pack_factor(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported (supported: {', '.join(map(str, SUPPORTED_BITS))}).")
    return 32 // bits


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> int32 values in [0, 2**bits), ``32 // bits`` times as many along ``dim``."""
    pf = pack_factor(bits)
    dim = dim % packed.dim()
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    vals = (packed.unsqueeze(dim + 1) >> shifts.view([pf] + [1] * (packed.dim() - dim - 1))) & ((1 << bits) - 1)
    return vals.flatten(dim, dim + 1)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of ``unpack_int32``: values in [0, 2**bits) (any integer dtype) -> int32 words."""
    pf = pack_factor(bits)
    dim = dim % values.dim()
    if values.shape[dim] % pf:
        raise ValueError(f"cannot pack {values.shape[dim]} values along dim {dim} into words of {pf}")
    v = values.to(torch.int64).unflatten(dim, (values.shape[dim] // pf, pf))
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (v << shifts.view([pf] + [1] * (values.dim() - dim - 1))).sum(dim + 1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def hf_module_names(prefix: str) -> list[str]:
    """``model.layers.0.self_attn.qkv_proj`` -> the q/k/v module names; any other prefix -> [prefix]."""
    head, _, last = prefix.rpartition(".")
    parts = FUSED_MODULES.get(last)
    if parts is None:
        return [prefix]
    return [f"{head}.{p}" if head else p for p in parts]


def derive_shapes(checkpoint_shapes: dict, fn: Callable[[int, int], tuple[int, ...]]) -> dict:
    """A quantized parameter's ``checkpoint_shapes`` from the unquantized weight's ``{shard: (out, in)}``:
    ``fn(out, in)`` gives the HF tensor's shape for one shard."""
    return {shard: tuple(fn(out, inp)) for shard, (out, inp) in checkpoint_shapes.items()}


def add_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, attrs: dict[str, Any],
              extra_weight_attrs: dict[str, Any]) -> nn.Parameter:
    """Registers an empty parameter ``name`` on ``layer`` with ``attrs`` (dims, checkpoint shapes)
    and the layer's ``extra_weight_attrs`` (its weight loader) unless ``attrs`` overrides them."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(param, attrs)
    set_weight_attrs(param, {k: v for k, v in extra_weight_attrs.items() if k not in attrs})
    layer.register_parameter(name, param)
    return param


def replace_parameter(layer: nn.Module, name: str, value: Optional[torch.Tensor]) -> None:
    """Sets ``layer.<name>`` to a fresh parameter holding ``value`` (None: removes it), dropping the
    loading attributes of the old one."""
    if name in layer._parameters:
        del layer._parameters[name]
    if value is None:
        setattr(layer, name, None)
        return
    layer.register_parameter(name, nn.Parameter(value, requires_grad=False))


def layer_name(layer: nn.Module) -> str:
    """The layer's name in the model for error messages (``LinearBase.prefix``)."""
    return getattr(layer, "prefix", "") or type(layer).__name__


def check_divisible(value: int, by: int, what: str, layer: nn.Module, by_what: str = "") -> None:
    """ValueError naming the layer unless ``value`` (``what``) is a multiple of ``by`` (``by_what``)."""
    if by <= 0 or value % by:
        by_text = f"the {by_what} ({by})" if by_what else str(by)
        raise ValueError(f"{layer_name(layer)}: {what} ({value}) must be a multiple of {by_text}.")
