"""Activations. ``silu_and_mul`` is the torch computation (the CPU path and the tests' reference); the
``SiluAndMul`` layer runs ``fused_ops.silu_and_mul`` (Triton for CUDA tensors). ``GeluAndMul`` is the
gated GELU of Gemma (GeGLU); ``get_act_fn`` the plain activation of a non-gated MLP (GPT-2, GPT-NeoX)
by its HF ``hidden_act`` name."""

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


def gelu_and_mul(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """x: [..., 2 * d] holding [gate, up] -> gelu(gate) * up: [..., d]."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate=approximate) * x[..., d:]


class GeluAndMul(nn.Module):
    """[..., 2 * d] = [gate | up] -> gelu(gate) * up, ``approximate`` "tanh" (HF ``gelu_pytorch_tanh``)
    or "none" (erf, HF ``gelu``); ``fused_ops.gelu_and_mul`` (Triton for CUDA tensors)."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GeluAndMul approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fused.gelu_and_mul(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


# HF activation name -> F.gelu's ``approximate`` (the tanh formula of gelu_new / gelu_fast /
# gelu_pytorch_tanh is one function: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))).
GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


def gelu_and_mul_for(name: str, field: str = "hidden_act") -> GeluAndMul:
    """The gated GELU for HF activation ``name``; ValueError naming ``field`` for any other."""
    if name not in GELU_APPROXIMATE:
        raise ValueError(f"Unsupported {field} {name!r}: this model supports {', '.join(sorted(GELU_APPROXIMATE))}.")
    return GeluAndMul(GELU_APPROXIMATE[name])


def get_act_fn(name: str, field: str = "hidden_act") -> nn.Module:
    """The element-wise activation HF calls ``name`` (gelu family, relu, silu); ValueError naming
    ``field`` for any other."""
    if name in GELU_APPROXIMATE:
        return nn.GELU(approximate=GELU_APPROXIMATE[name])
    if name == "relu":
        return nn.ReLU()
    if name in ("silu", "swish"):
        return nn.SiLU()
    supported = sorted([*GELU_APPROXIMATE, "relu", "silu"])
    raise ValueError(f"Unsupported {field} {name!r}: supported {', '.join(supported)}.")


# Last: fused_ops imports this module for its torch path (silu_and_mul above), and only calls into it later.
from vllm_engine.layers import fused_ops as _fused  # noqa: E402
