"""FP8 W8A8: e4m3 weights with float32 scales, activations quantized to e4m3 per token (dynamic) or
with the checkpoint's per-tensor scale (static); products on FP8 tensor cores.

Two sources of weights:

* an HF ``fp8`` checkpoint (``quantization_config``: ``quant_method: "fp8"``, ``activation_scheme``
  ``"dynamic"`` or ``"static"``, ``ignored_layers``): per module ``weight`` float8_e4m3fn [N, K],
  ``weight_scale`` (one float32: per tensor) and, when static, ``input_scale`` (one float32); or with
  ``weight_block_size`` [block_n, block_k] (DeepSeek / Qwen3 FP8): ``weight_scale_inv`` per block,
  activations per token and group of block_k (``Fp8BlockLinearMethod``, kernels/fp8_block.py);
* ``quantization="fp8"`` on an unquantized checkpoint: each weight quantized at load with one scale
  per output channel (``amax / 448``), activations dynamic per token.

``y = (x_q * x_scale) @ (w_q * w_scale).T + bias``. Fused q/k/v (gate/up) modules keep each part's
weight scale (spread per output channel); a static input scale is the largest of the parts' (so
that no part's activations overflow). On CUDA GPUs with FP8 tensor cores (compute capability 8.9+)
the product is ``torch._scaled_mm`` with row-wise scales; elsewhere the same arithmetic in float32
(the quantized values dequantized: the CPU path and the tests' reference).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig
from vllm_engine.quantization.unquantized import UnquantizedLinearMethod
from vllm_engine.quantization.utils import add_param, hf_module_names, layer_name, replace_parameter

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # keeps an all-zero row's scale from dividing by zero


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to e4m3 (``scale`` broadcasts: a scalar, [M, 1] or [N, 1])."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def per_token_scales(x: torch.Tensor) -> torch.Tensor:
    """[M, 1] float32: each row's absolute maximum over 448 (the dynamic activation scales)."""
    return (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], float32 scales [N]): one scale per output channel."""
    scale = per_token_scales(weight)
    return quantize_fp8(weight, scale), scale.squeeze(1)


def scaled_mm_supported(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               use_scaled_mm: bool = False) -> torch.Tensor:
    """x [M, K] (16-bit or float32) times the e4m3 ``weight`` [N, K] with ``weight_scale`` [N] float32;
    x quantized per token, or with the scalar ``input_scale`` (static). -> [M, N] in x.dtype.
    ``use_scaled_mm``: ``torch._scaled_mm`` (bf16 x, K and N multiples of 16), else float32 arithmetic."""
    if input_scale is None:  # one Triton kernel on CUDA
        from vllm_engine.quantization.kernels.fp8_block import quantize_per_token_group

        x_q, x_scale = quantize_per_token_group(x, x.shape[1], use_triton=use_scaled_mm and x.is_cuda)
    else:
        x_scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
        x_q = quantize_fp8(x, x_scale)
    n, k = weight.shape
    if use_scaled_mm and x.dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0 and x.shape[0] > 0:
        # Row-wise scales; the bias is added after (not every torch version takes one with row-wise scales).
        y = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale.contiguous(), scale_b=weight_scale.view(1, n),
                             out_dtype=x.dtype)
        return y if bias is None else y + bias
    y = (x_q.float() * x_scale) @ (weight.float() * weight_scale[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class Fp8Config(QuantizationConfig):
    """``is_checkpoint_fp8``: the weights are e4m3 in the checkpoint (else quantized at load);
    ``activation_scheme``: ``"dynamic"`` (per token) or ``"static"`` (the checkpoint's input scales);
    ``ignored_layers``: HF module names (or suffixes) left unquantized."""

    def __init__(self, is_checkpoint_fp8: bool, activation_scheme: str = "dynamic",
                 ignored_layers: Optional[list[str]] = None, device: Optional[torch.device] = None,
                 weight_block_size: Optional[tuple[int, int]] = None) -> None:
        self.is_checkpoint_fp8 = is_checkpoint_fp8
        self.weight_block_size = weight_block_size
        self.activation_scheme = activation_scheme
        self.ignored_layers = list(ignored_layers or [])
        self.device = device
        self._linear: Optional[Fp8LinearMethod] = None
        self._unquantized: Optional[UnquantizedLinearMethod] = None

    @classmethod
    def get_name(cls) -> str:
        return "fp8"

    @classmethod
    def quantizes_at_load(cls) -> bool:
        return True

    @classmethod
    def from_config(cls, config: dict[str, Any], device: Optional[torch.device] = None) -> "Fp8Config":
        is_checkpoint = str(config.get("quant_method", "")).lower() == "fp8"
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"quantization_config.activation_scheme={scheme!r} is not supported (dynamic or static).")
        block = config.get("weight_block_size")
        if block is not None:
            if (not isinstance(block, (list, tuple)) or len(block) != 2 or not all(isinstance(b, int) for b in block)
                    or block[0] < 1 or block[1] < 16 or block[1] & (block[1] - 1)):
                raise ValueError(f"quantization_config.weight_block_size={block!r} is not supported ([block_n, "
                                 "block_k], block_k a power of two >= 16).")
            if scheme != "dynamic" or not is_checkpoint:
                raise ValueError("quantization_config.weight_block_size needs an fp8 checkpoint with "
                                 "activation_scheme='dynamic'.")
        if scheme == "static" and not is_checkpoint:
            raise ValueError("activation_scheme='static' needs the input scales of an fp8 checkpoint.")
        return cls(is_checkpoint, scheme, config.get("ignored_layers") or config.get("modules_to_not_convert"), device,
                   tuple(block) if block else None)

    def is_quantized(self, prefix: str) -> bool:
        names = hf_module_names(prefix)
        ignored = {any(n == m or n.endswith("." + m) for m in self.ignored_layers) for n in names}
        if len(ignored) > 1:
            raise ValueError(f"{prefix}: ignored_layers leaves some of {', '.join(names)} unquantized but not all; "
                             "fused modules must be quantized alike.")
        return not ignored.pop()

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        from vllm_engine.layers.linear import LinearBase

        if isinstance(layer, LinearBase) and self.is_quantized(prefix):
            if self._linear is None:
                self._linear = (Fp8BlockLinearMethod(self.weight_block_size) if self.weight_block_size else
                                Fp8LinearMethod(self.is_checkpoint_fp8, self.activation_scheme == "static",
                                                device=self.device))
            return self._linear
        if self._unquantized is None:
            self._unquantized = UnquantizedLinearMethod(self.device)
        return self._unquantized


class Fp8LinearMethod(LinearMethodBase):
    """After loading every layer holds ``weight`` e4m3 [N, K], ``weight_scale`` float32 [N] and
    ``input_scale`` (a float32 scalar, static activations) or None.

    ``is_checkpoint_fp8``: the checkpoint holds e4m3 ``weight`` and ``weight_scale`` (one per tensor, or
    with ``per_channel_scales`` [N, 1]), and with ``static_activations`` one ``input_scale`` per
    tensor; else the weight is quantized at load, per output channel."""

    def __init__(self, is_checkpoint_fp8: bool, static_activations: bool = False, per_channel_scales: bool = False,
                 device: Optional[torch.device] = None) -> None:
        self.is_checkpoint_fp8 = is_checkpoint_fp8
        self.static_activations = static_activations
        self.per_channel_scales = per_channel_scales
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.use_scaled_mm = scaled_mm_supported(device)

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        n, k = sum(output_partition_sizes), input_size_per_partition
        weight_dtype = FP8_DTYPE if self.is_checkpoint_fp8 else params_dtype
        add_param(layer, "weight", (n, k), weight_dtype, {"input_dim": 1, "output_dim": 0}, extra_weight_attrs)
        layer.fp8_partition_sizes = list(output_partition_sizes)
        if not self.is_checkpoint_fp8:
            return
        shapes = extra_weight_attrs["checkpoint_shapes"]
        per_shard = {"checkpoint_shapes": {s: (1,) for s in shapes}, "weight_loader": _per_shard_scalar(list(shapes))}
        if self.per_channel_scales:
            add_param(layer, "weight_scale", (n, 1), torch.float32,
                      {"output_dim": 0, "checkpoint_shapes": {s: (o, 1) for s, (o, _) in shapes.items()}},
                      extra_weight_attrs)
        else:
            add_param(layer, "weight_scale", (len(shapes),), torch.float32, per_shard, extra_weight_attrs)
        if self.static_activations:
            add_param(layer, "input_scale", (len(shapes),), torch.float32, per_shard, extra_weight_attrs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.is_checkpoint_fp8:
            if not bool((layer.weight_scale.data > 0).all()):
                raise ValueError(f"{layer_name(layer)}: weight_scale must be positive, got {layer.weight_scale.data}.")
            weight, scale = layer.weight.data, layer.weight_scale.data
            if self.per_channel_scales:
                scale = scale.squeeze(1)
            else:  # each fused part's scale over its rows
                scale = scale.repeat_interleave(torch.tensor(layer.fp8_partition_sizes, device=scale.device))
            input_scale = layer.input_scale.data.max() if self.static_activations else None
        else:
            weight, scale = quantize_weight_per_channel(layer.weight.data)
            input_scale = None
        replace_parameter(layer, "weight", weight.contiguous())
        replace_parameter(layer, "weight_scale", scale.float().contiguous())
        replace_parameter(layer, "input_scale", input_scale)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fp8_linear(x, layer.weight, layer.weight_scale, layer.input_scale, bias,
                          self.use_scaled_mm and x.is_cuda)


class Fp8BlockLinearMethod(LinearMethodBase):
    """Block-scaled FP8 checkpoints (``weight_block_size`` [block_n, block_k]): ``weight`` e4m3 [N, K] and
    ``weight_scale_inv`` float32 [ceil(N / block_n), K / block_k] (despite its name, the factor that
    dequantizes: ``w = weight * weight_scale_inv[n // block_n, k // block_k]``); activations dynamic per
    token and group of block_k (kernels/fp8_block.py). After loading ``weight_scale_inv`` holds one
    row per output row [N, K / block_k]."""

    def __init__(self, block_size: tuple[int, int]) -> None:
        self.block_n, self.block_k = block_size

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        n, k = sum(output_partition_sizes), input_size_per_partition
        for size, what in ((k, "input features per rank"), (input_size, "input features")):
            if size % self.block_k:
                raise ValueError(f"{layer_name(layer)}: {what} ({size}) must be a multiple of the FP8 weight block's "
                                 f"{self.block_k} columns.")
        add_param(layer, "weight", (n, k), FP8_DTYPE, {"input_dim": 1, "output_dim": 0}, extra_weight_attrs)
        shapes = extra_weight_attrs["checkpoint_shapes"]
        add_param(layer, "weight_scale_inv", (n, k // self.block_k), torch.float32,
                  {"input_dim": 1, "output_dim": 0,
                   "checkpoint_shapes": {s: (o, i // self.block_k) for s, (o, i) in shapes.items()},
                   "weight_loader": self._row_scales_loader(extra_weight_attrs["weight_loader"], shapes)},
                  extra_weight_attrs)

    def _row_scales_loader(self, layer_loader: Any, shapes: dict) -> Any:
        """Checks a block-scale tensor's shape, repeats each block's scale over its rows, then slices."""

        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            out, inp = shapes[shard_id]
            want = (-(-out // self.block_n), inp // self.block_k)
            if tuple(loaded.shape) != want:
                raise ValueError(f"has shape {tuple(loaded.shape)}, expected {want} (one scale per "
                                 f"{self.block_n}x{self.block_k} block)")
            rows = loaded.repeat_interleave(self.block_n, dim=0)[:out]
            layer_loader(param, rows, *(() if shard_id is None else (shard_id,)))

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not bool((layer.weight_scale_inv.data > 0).all()):
            raise ValueError(f"{layer_name(layer)}: weight_scale_inv must be positive.")
        replace_parameter(layer, "weight", layer.weight.data)
        replace_parameter(layer, "weight_scale_inv", layer.weight_scale_inv.data.contiguous())

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        from vllm_engine.quantization.kernels.fp8_block import fp8_block_linear

        return fp8_block_linear(x, layer.weight, layer.weight_scale_inv, self.block_k, bias)


def _per_shard_scalar(shards: list) -> Any:
    """Loader of a one-number-per-checkpoint-tensor parameter [len(shards)]: shard s's scalar at its index."""

    def load(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if loaded_weight.numel() != 1:
            raise ValueError(f"has shape {tuple(loaded_weight.shape)}, expected one number (a per-tensor scale)")
        param.data[shards.index(shard_id)] = loaded_weight.reshape(())

    return load


__all__ = ["FP8_DTYPE", "Fp8BlockLinearMethod", "Fp8Config", "Fp8LinearMethod", "fp8_linear", "per_token_scales",
           "quantize_fp8",
           "quantize_weight_per_channel"]
