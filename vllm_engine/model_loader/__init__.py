"""Builds the model for a ModelConfig and fills its weights (safetensors, GGUF or dummy)."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionBackend
from vllm_engine.models.registry import get_model_class
from vllm_engine.quantization import get_quant_config
from vllm_engine.quantization.base import QuantizationConfig

logger = logging.getLogger(__name__)


def get_model(model_config: Any, device: torch.device, attn_backend: AttentionBackend) -> nn.Module:
    """The model of ``model_config`` on ``device`` in ``model_config.dtype``, weights loaded, in eval mode.

    Parameters are allocated once, directly on the device (no meta -> CPU -> device round trip), and
    filled in place, each with this rank's slice (``vllm_engine.distributed``: the tensor-parallel rank
    and pipeline stage of this process): dummy weights are drawn on the device; checkpoint tensors are
    streamed (on CUDA through pinned chunks overlapped with the reads, each rank reading only its
    rows: ``iter_safetensors``). Then each layer's quant method processes its weights.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    model, quant_config = build_model(model_config, device, attn_backend)
    load_format = model_config.load_format
    if load_format == "dummy":
        from vllm_engine.model_loader.weights import init_dummy_weights

        init_dummy_weights(model, model_config.seed)
    elif load_format == "safetensors":
        from vllm_engine.model_loader.weights import iter_safetensors

        path = model_config.model_path
        rows = model.checkpoint_row_ranges() if hasattr(model, "checkpoint_row_ranges") else None
        load_checkpoint(model, iter_safetensors(path, device, model_config.dtype, rows=rows), path)
    elif load_format == "gguf":
        from vllm_engine.model_loader.gguf_loader import iter_gguf_weights

        path = model_config.gguf_file or model_config.model_path
        keep = frozenset(getattr(quant_config, "tensor_types", ()))
        weights = iter_gguf_weights(path, model_config.hf_config, device, model_config.dtype, keep_quantized=keep)
        load_checkpoint(model, weights, path)
    else:
        raise ValueError(f"Unknown load_format {load_format!r}; expected safetensors, gguf or dummy.")
    process_weights_after_loading(model)
    logger.info("loaded %s (%s weights, %.0fM parameters) in %.2fs", model_config.architecture, load_format,
                sum(p.numel() for p in model.parameters()) / 1e6, time.perf_counter() - t0)
    return model.eval()


def build_model(model_config: Any, device: torch.device,
                attn_backend: AttentionBackend) -> tuple[nn.Module, Optional[QuantizationConfig]]:
    """The model of ``model_config`` for this rank, its parameters allocated on ``device`` and not
    filled yet (what ``get_model`` loads into; the weight-loading benchmark loads into it repeatedly),
    and the quantization config its layers were built with."""
    device = torch.device(device)
    hf_config = model_config.hf_config
    cls = get_model_class(model_config.architecture)
    max_position = model_config.max_model_len  # no position reaches it: the cos/sin cache stops there
    # One for the whole model: one linear picker.
    quantization = getattr(model_config, "quantization", None)
    if quantization == "gguf":  # the blocks kept quantized: the file's tensor types
        from vllm_engine.quantization.gguf import GGUFConfig

        quant_config = GGUFConfig.from_gguf_file(model_config.gguf_file or model_config.model_path, device)
    else:
        quant_config = get_quant_config(hf_config, device, quantization)
    with torch.device(device):
        model = cls(hf_config, attn_backend, max_position=max_position, dtype=model_config.dtype,
                    quant_config=quant_config)
    return model, quant_config


def load_checkpoint(model: nn.Module, weights: Any, source: str) -> None:
    """Loads and checks that every parameter (every shard of a fused one) was filled."""
    with torch.no_grad():
        loaded = model.load_weights(weights)
    missing = sorted(model.expected_weights() - loaded)
    if missing:
        shown = ", ".join(missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"Checkpoint {source} lacks {len(missing)} tensor(s) the model needs: {shown}{more}.")


@torch.no_grad()
def process_weights_after_loading(model: nn.Module) -> None:
    """Each layer's quant method, once, after its weights were loaded (repacking for a kernel...)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


__all__ = ["build_model", "get_model", "load_checkpoint", "process_weights_after_loading"]
