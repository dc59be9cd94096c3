"""What the integer weight-only methods (GPTQ, compressed-tensors W4A16/W8A16, AWQ) share after
loading: each unpacks its checkpoint tensors to integers and calls ``WNA16LinearMethodBase.finish``,
which repacks them into the kernels' layout (kernels/wna16.py) and sets ``layer.wna16``; ``apply``
multiplies by it: the Triton kernels (through the measured ``WNA16Picker``) on CUDA, the torch
dequantize-and-matmul elsewhere. On CUDA ``apply_add_norm`` / ``apply_act`` may fold the norm or the
SiLU-and-mul before the product into the GEMV (kernels/wna16_fused.py), where measured faster.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vllm_engine import envs
from vllm_engine.layers.activation import SiluAndMul
from vllm_engine.layers.layernorm import RMSNorm
from vllm_engine.quantization.base import LinearMethodBase
from vllm_engine.quantization.kernels.wna16 import WNA16Weight, dequant_linear
from vllm_engine.quantization.kernels.wna16_picker import WNA16Picker
from vllm_engine.quantization.utils import layer_name, pack_int32, replace_parameter


class WNA16LinearMethodBase(LinearMethodBase):
    """``apply`` for weights in the kernels' layout; subclasses register the checkpoint's tensors
    (``create_weights``) and turn them into that layout (``process_weights_after_loading`` ->
    ``finish``). One instance serves many layers: one picker, each shape timed once."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.picker: Optional[WNA16Picker] = None
        if device.type == "cuda":
            try:
                self.picker = WNA16Picker()
            except ImportError:  # pragma: no cover - no Triton: the torch path
                self.picker = None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.picker is not None and x.is_cuda:
            return self.picker(x, layer.wna16, bias)
        return dequant_linear(x, layer.wna16, bias)

    def apply_add_norm(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
                       bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """On CUDA the RMSNorm may be folded into the GEMV (the picker measures it; ``VLLM_ENGINE_FOLD=0``: never)."""
        if self.picker is not None and x.is_cuda and envs.fold_enabled() and type(norm) is RMSNorm:
            return self.picker.add_norm_linear(x, residual, norm.weight, norm.variance_epsilon, layer.wna16, bias)
        return super().apply_add_norm(layer, x, residual, norm, bias)

    def apply_act(self, layer: nn.Module, x: torch.Tensor, act_fn: nn.Module,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """On CUDA SiLU-and-mul may be folded into the GEMV, as ``apply_add_norm`` folds the norm."""
        if self.picker is not None and x.is_cuda and envs.fold_enabled() and type(act_fn) is SiluAndMul:
            return self.picker.silu_mul_linear(x, layer.wna16, bias)
        return super().apply_act(layer, x, act_fn, bias)

    @staticmethod
    def finish(layer: nn.Module, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               bits: int, group_size: int, g_idx: Optional[torch.Tensor], drop: tuple[str, ...],
               mins: Optional[torch.Tensor] = None, lut: Optional[torch.Tensor] = None) -> None:
        """Sets ``layer.wna16`` from this rank's unpacked weight.

        ``q`` [K, N] integers in [0, 2**bits); ``scales`` [G, N]; ``zeros`` [G, N] unsigned integer zero
        points or None (symmetric: 2**(bits - 1)); ``group_size`` (K for per-channel scales);
        ``g_idx`` [K] the group of each row (act order) or None (row k in group k // group_size).
        Rows of an act-order weight are sorted by group when that makes groups runs of
        ``group_size`` (the input is permuted to match); else the kernels read ``g_idx``.
        ``drop``: the checkpoint parameters to remove from the layer. ``mins`` [G, N] (with ``zeros``
        None): ``w = q * scale + min`` instead (GGUF). ``lut`` [N, 2**bits] (scales None, one group):
        ``w = lut[n, q]`` (SqueezeLLM)."""
        k = q.shape[0]
        half = 1 << (bits - 1)
        if zeros is not None and bool((zeros == half).all()):
            zeros = None
        perm = None
        if g_idx is not None:
            g_idx = g_idx.long()
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
                raise ValueError(f"{layer_name(layer)}: g_idx holds groups outside [0, {scales.shape[0]}).")
            order = torch.argsort(g_idx, stable=True)
            if torch.equal(g_idx[order], torch.arange(k, device=q.device) // group_size):
                if not torch.equal(order, torch.arange(k, device=q.device)):
                    perm, q = order, q[order]
                g_idx = None
        for name in drop:
            replace_parameter(layer, name, None)
        replace_parameter(layer, "qweight", pack_int32(q, bits, 0))
        replace_parameter(layer, "scales", scales.contiguous() if scales is not None else None)
        replace_parameter(layer, "zeros", zeros.to(scales.dtype).contiguous() if zeros is not None else None)
        replace_parameter(layer, "mins", mins.contiguous() if mins is not None else None)
        replace_parameter(layer, "g_idx", g_idx.to(torch.int32) if g_idx is not None else None)
        if perm is not None:
            layer.register_buffer("input_perm", perm, persistent=False)
        if lut is not None:
            replace_parameter(layer, "lookup_table", lut.contiguous())
        layer.wna16 = WNA16Weight(layer.qweight, layer.scales, layer.zeros, layer.g_idx, perm, bits, group_size,
                                  layer.mins, layer.lookup_table if lut is not None else None)
