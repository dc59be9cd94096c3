"""RMSNorm with an optional fused residual add (the shape vLLM's fused kernels use)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn


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
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return rms_norm(x, self.weight, self.variance_epsilon, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
