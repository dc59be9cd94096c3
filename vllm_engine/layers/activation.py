"""Gated activations. ``silu_and_mul`` is the torch computation (the CPU path and the tests'
reference); the ``SiluAndMul`` layer runs ``fused_ops.silu_and_mul`` (Triton for CUDA tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] holding [gate, up] -> silu(gate) * up: [..., d]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class SiluAndMul(nn.Module):
    """[..., 2 * d] = [gate | up] -> silu(gate) * up. A down projection may fold it into its GEMV
    (``RowParallelLinear.forward_act``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fused.silu_and_mul(x)


# Last: fused_ops imports this module for its torch path (silu_and_mul above), and only calls into it later.
from vllm_engine.layers import fused_ops as _fused  # noqa: E402
