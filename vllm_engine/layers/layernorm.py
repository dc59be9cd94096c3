"""RMSNorm with an optional fused residual add (the shape vLLM's fused kernels use); Gemma's RMSNorm
(gain 1 + w); LayerNorm with a bias (GPT-2, GPT-NeoX).

``rms_norm`` is the torch computation (the CPU path and the tests' reference); the ``RMSNorm``
layer runs ``fused_ops.rms_norm`` / ``fused_add_rms_norm``, which take the Triton kernels for CUDA
tensors and this torch computation for the rest.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from vllm_engine.layers.utils import check_shape, default_weight_loader, set_weight_attrs


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``y = x / rms(x) * weight`` computed in float32, returned in ``x.dtype``.

    With ``residual``: ``x = x + residual`` first, and returns ``(y, x)`` (the sum is the next
    layer's residual), as HF computes it: the sum is rounded to ``x.dtype`` before the norm.
    x: [..., hidden]; weight: [hidden].
    """
    if residual is not None:
        x = x + residual
        residual = x
    orig_dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(orig_dtype)
    return out if residual is None else (out, residual)


class RMSNorm(nn.Module):
    """``norm(x) -> y``; ``norm(x, residual) -> (y, x + residual)``. The weight is created
    uninitialised (the loader fills it: a checkpoint, or 1 for dummy weights)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})
        self.variance_epsilon = eps

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is None:
            return _fused.rms_norm(x, self.weight, self.variance_epsilon)
        return _fused.fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


def gemma_norm_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
    """Gemma checkpoints store an RMSNorm's gain as ``w`` and multiply by ``1 + w``: we hold ``1 + w``
    (added in float32, then rounded once to the parameter's dtype), so the plain RMSNorm kernels (and
    a norm folded into a GEMV) serve Gemma unchanged. In bf16 the gain is rounded as 1 + w rather
    than w (up to 2^-9 relative), within the rounding of the normalized activations themselves."""
    check_shape(param, loaded_weight, shard_id)
    param.data.copy_(1.0 + loaded_weight.float())


class GemmaRMSNorm(RMSNorm):
    """Gemma 1/2/3's RMSNorm, ``x / rms(x) * (1 + w)`` of the checkpoint's ``w``: an ``RMSNorm`` whose
    weight is loaded as ``1 + w`` (``gemma_norm_weight_loader``). Dummy weights (gain 1) are w = 0."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(hidden_size, eps, dtype)
        self.weight.weight_loader = gemma_norm_weight_loader


class LayerNorm(nn.Module):
    """``F.layer_norm`` with weight and bias (HF ``nn.LayerNorm`` parameter names); like ``RMSNorm``,
    ``norm(x, residual) -> (norm(x + residual), x + residual)``. In x's dtype, as HF's
    ``nn.LayerNorm`` runs (the kernels accumulate in float32): one kernel on the GPU."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        for p in (self.weight, self.bias):
            set_weight_attrs(p, {"weight_loader": default_weight_loader})
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is not None:
            x = residual = x + residual
        y = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return y if residual is None else (y, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# Last: fused_ops imports this module for its torch path (rms_norm above), and only calls into it later.
from vllm_engine.layers import fused_ops as _fused  # noqa: E402
