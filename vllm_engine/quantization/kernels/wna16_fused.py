"""The W4A16 / W8A16 GEMV with the elementwise op before it folded in (CUDA, a few rows), as the
unquantized GEMV folds them (layers/triton_linear.py): one kernel instead of two per projection.

* ``wna16_add_norm_gemv``: ``(linear(rms_norm(x + residual) * g), x + residual)``, the residual add and
  RMSNorm before q/k/v or gate/up. Every program streams all of K, so each accumulates the sum of
  squares itself and scales its outputs by 1 / RMS at the end; program 0 stores x + residual.
* ``wna16_silu_mul_gemv``: ``linear(silu(x[:, :K]) * x[:, K:])``, the activation before a down projection.

Both are ``wna16._wna16_gemv_kernel`` with its input op switched on (``_gemv_x_at``, rounding as the
unfused ops do). Weights whose input columns are permuted (act order sorted into runs) are not
folded: the op runs first, then the permuted product.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_engine.quantization.kernels.wna16 import WNA16Weight, launch_gemv


def _launch(x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor], config: tuple, silu_mul: bool,
            norm: Optional[tuple]) -> torch.Tensor:
    """One fused launch; ``norm``: (residual, norm weight, residual out, eps)."""
    if w.perm is not None:
        raise ValueError("wna16 fused GEMV: a weight with permuted input columns cannot fold the op before it")
    y = torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    return launch_gemv(x, w, bias, y, config[:4], silu_mul, norm)


def wna16_add_norm_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        w: WNA16Weight, bias: Optional[torch.Tensor] = None,
                        config: tuple = (64, 256, 4, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [M, K] (M small) -> (linear(rms_norm(x + residual) * norm_weight), x + residual)."""
    if (x.dim() != 2 or residual.shape != x.shape or x.shape[1] != w.in_features or x.stride(-1) != 1
            or residual.stride(-1) != 1 or norm_weight.shape != (x.shape[1],)):
        raise ValueError(f"wna16 add_norm GEMV: x {tuple(x.shape)}, residual {tuple(residual.shape)}, norm weight "
                         f"{tuple(norm_weight.shape)} do not match a weight of {w.in_features} inputs")
    res_out = torch.empty_like(x)
    return _launch(x, w, bias, config, False, (residual, norm_weight, res_out, eps)), res_out


def wna16_silu_mul_gemv(x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor] = None,
                        config: tuple = (64, 256, 4, 3)) -> torch.Tensor:
    """x [M, 2K] = [gate | up] (M small) -> linear(silu(gate) * up)."""
    if x.dim() != 2 or x.shape[1] != 2 * w.in_features or x.stride(-1) != 1:
        raise ValueError(f"wna16 silu_mul GEMV: x {tuple(x.shape)} must hold gate and up for a weight of "
                         f"{w.in_features} inputs")
    return _launch(x, w, bias, config, True, None)


__all__ = ["wna16_add_norm_gemv", "wna16_silu_mul_gemv"]
