"""RMSNorm with an optional fused residual add (the shape vLLM's fused kernels use).

``rms_norm`` is the torch computation (the CPU path and the tests' reference); the ``RMSNorm``
layer runs ``fused_ops.rms_norm`` / ``fused_add_rms_norm``, which take the Triton kernels for CUDA
tensors and this torch computation for the rest.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from vllm_engine.layers.utils import default_weight_loader, set_weight_attrs


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


# Last: fused_ops imports this module for its torch path (rms_norm above), and only calls into it later.
from vllm_engine.layers import fused_ops as _fused  # noqa: E402
