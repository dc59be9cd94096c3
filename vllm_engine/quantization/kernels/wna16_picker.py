"""``WNA16Picker``: which W4A16 / W8A16 kernel and tile config serves each shape on CUDA, measured the
first time the shape comes (kernels/wna16.py has the kernels, kernels/wna16_fused.py the folded GEMVs)."""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch

from vllm_engine.quantization.kernels.wna16 import (GEMM_CONFIGS, GEMV_CONFIGS, GEMV_MAX_ROWS, MAX_KERNEL_ROWS,
                                                    WNA16Weight, dequant_linear, triton, wna16_gemm, wna16_gemv)

logger = logging.getLogger(__name__)


def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


class WNA16Picker:
    """``picker(x, w, bias)``: the product by the kernel config measured fastest for the shape (rows
    rounded up to a power of 2, N, K, bits, group size, zeros, g_idx, dtype), timed on first use
    (never inside a CUDA graph capture) as ``LinearPicker`` does; inputs of more than
    ``MAX_KERNEL_ROWS`` rows take ``dequant_linear``. ``timer(fn, flush=...) -> seconds`` is injectable."""

    def __init__(self, timer: Optional[Callable[..., float]] = None) -> None:
        if timer is None:
            from vllm_engine.layers.triton_linear import cuda_time_s

            timer = cuda_time_s
        self.timer = timer
        self.decisions: dict[tuple, tuple[str, dict[str, float]]] = {}
        self._fns: dict[tuple, Callable] = {}

    @staticmethod
    def candidates(m: int) -> dict[str, Callable]:
        if m <= GEMV_MAX_ROWS:
            return {"gemv %dx%d w%d s%d" % c[:4] + (" k%d" % c[4] if len(c) > 4 else ""):
                    functools.partial(wna16_gemv, config=c) for c in GEMV_CONFIGS}
        out = {"gemm %dx%dx%d w%d s%d" % c[:5] + "".join(" " + f for f in c[5:]): functools.partial(wna16_gemm, config=c)
               for c in GEMM_CONFIGS if c[0] <= max(16, _bucket(m))}
        out["dequant+cublas"] = dequant_linear
        return out

    def __call__(self, x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = x.shape[0]
        if triton is None or not x.is_cuda or m == 0 or m > MAX_KERNEL_ROWS:
            return dequant_linear(x, w, bias)
        key = (_bucket(m), w.out_features, w.in_features, w.bits, w.group_size, w.zeros is not None,
               w.g_idx is not None, w.mins is not None, w.lut is not None, x.dtype, bias is not None)
        fn = self._fns.get(key)
        if fn is None:
            if torch.cuda.is_current_stream_capturing():
                return (wna16_gemv if m <= GEMV_MAX_ROWS else wna16_gemm)(x, w, bias)
            fn = self._decide(key, x, w, bias)
        return fn(x, w, bias)

    def _decide(self, key: tuple, x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor]) -> Callable:
        return self._time(key, self.candidates(x.shape[0]), (x, w, bias))

    def _time(self, key: tuple, candidates: dict[str, Callable], args: tuple) -> Callable:
        """Times every candidate on ``args`` (L2 flushed by a read) and keeps the fastest for ``key``."""
        times = {name: self.timer(lambda fn=fn: fn(*args), flush="read") for name, fn in candidates.items()}
        choice = min(times, key=times.get)
        self.decisions[key] = (choice, times)
        self._fns[key] = candidates[choice]
        logger.debug("wna16 %s: %s (%s)", key, choice, {k: f"{v * 1e6:.1f}us" for k, v in times.items()})
        return self._fns[key]

    def add_norm_linear(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        w: WNA16Weight, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(linear(rms_norm(x + residual) * norm_weight), x + residual)``: the norm kernel then this
        picker's product ("unfused"), or the norm folded into the GEMV (kernels/wna16_fused.py) where
        that measured faster (1-4 rows on CUDA, weights without an input permutation)."""
        from vllm_engine.layers import fused_ops
        from vllm_engine.quantization.kernels.wna16_fused import wna16_add_norm_gemv

        def unfused(x, residual, norm_weight, eps, w, bias):
            h, res = fused_ops.fused_add_rms_norm(x, residual, norm_weight, eps)
            return self(h, w, bias), res

        return self._fused("add_norm", wna16_add_norm_gemv, unfused, x, residual, norm_weight, eps, w, bias)

    def silu_mul_linear(self, x: torch.Tensor, w: WNA16Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``linear(silu(x[:, :K]) * x[:, K:])``, the activation folded into the GEMV where faster."""
        from vllm_engine.layers import fused_ops
        from vllm_engine.quantization.kernels.wna16_fused import wna16_silu_mul_gemv

        def unfused(x, w, bias):
            return self(fused_ops.silu_and_mul(x), w, bias)

        return self._fused("silu_mul", wna16_silu_mul_gemv, unfused, x, w, bias)

    def _fused(self, kind: str, kernel: Callable, unfused: Callable, x: torch.Tensor, *rest) -> object:
        """``unfused(x, *rest)`` or ``kernel`` (its GEMV configs without split-K), whichever measured
        faster for the key; ``rest`` ends with (weight, bias)."""
        w, bias = rest[-2], rest[-1]
        args = (x, *rest)
        if triton is None or not x.is_cuda or not 0 < x.shape[0] <= GEMV_MAX_ROWS or w.perm is not None:
            return unfused(*args)
        key = (kind, _bucket(x.shape[0]), w.out_features, w.in_features, w.bits, w.group_size, w.zeros is not None,
               w.g_idx is not None, w.mins is not None, w.lut is not None, x.dtype, bias is not None)
        fn = self._fns.get(key)
        if fn is None:
            if torch.cuda.is_current_stream_capturing():
                return unfused(*args)
            unfused(*args)  # the product's own decision first: "unfused" then times the picked kernel
            candidates = {"unfused": unfused}
            for c in GEMV_CONFIGS:
                if len(c) == 4:
                    candidates[f"{kind} gemv %dx%d w%d s%d" % c] = functools.partial(kernel, config=c)
            fn = self._time(key, candidates, args)
        return fn(*args)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for choice, _ in self.decisions.values():
            counts[choice.split()[0]] = counts.get(choice.split()[0], 0) + 1
        return "wna16 kernels over %d shapes: %s" % (len(self.decisions),
                                                     ", ".join(f"{c} for {n}" for c, n in sorted(counts.items())))
