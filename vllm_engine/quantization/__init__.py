"""Quantization methods: one config class per format (``base.QuantizationConfig``), each giving the
layers a ``LinearMethodBase`` (weights, loading, kernel). Only unquantized weights so far."""

from __future__ import annotations

from typing import Any, Optional

import torch

from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig
from vllm_engine.quantization.unquantized import UnquantizedConfig, UnquantizedLinearMethod, linear_picker

# HF ``quantization_config.quant_method`` -> config class.
QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {}


def get_quant_config(hf_config: Any, device: Optional[torch.device] = None) -> QuantizationConfig:
    """The quantization of a checkpoint (its HF ``quantization_config``), for a model on ``device``;
    ``UnquantizedConfig`` when it has none. ValueError for a method not implemented here."""
    qc = getattr(hf_config, "quantization_config", None)
    if not qc:
        return UnquantizedConfig(device)
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    name = str(qc.get("quant_method", "")).lower()
    cls = QUANTIZATION_METHODS.get(name)
    if cls is None:
        supported = ", ".join(sorted(QUANTIZATION_METHODS)) or "none yet"
        raise ValueError(f"Quantization method {name!r} is not supported (supported: {supported}); "
                         "use an unquantized checkpoint or a GGUF file.")
    return cls.from_config(qc, device)


__all__ = ["LinearMethodBase", "QUANTIZATION_METHODS", "QuantizationConfig", "UnquantizedConfig",
           "UnquantizedLinearMethod", "get_quant_config", "linear_picker"]
