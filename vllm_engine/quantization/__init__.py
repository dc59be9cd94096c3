"""Quantization methods: one config class per format (``base.QuantizationConfig``), each giving the
layers a ``LinearMethodBase`` (weights, loading, kernel). docs/quantization.md lists the formats.

The method comes from the checkpoint's ``config.json`` ``quantization_config.quant_method``, or from
``quantization=`` / ``--quantization``, which must then agree with the checkpoint (or name a method
that quantizes an unquantized checkpoint while loading).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from vllm_engine.quantization.awq import AWQConfig
from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig
from vllm_engine.quantization.compressed_tensors import CompressedTensorsConfig
from vllm_engine.quantization.fp8 import Fp8Config
from vllm_engine.quantization.gguf import GGUFConfig
from vllm_engine.quantization.gptq import GPTQConfig
from vllm_engine.quantization.squeezellm import SqueezeLLMConfig
from vllm_engine.quantization.unquantized import UnquantizedConfig, UnquantizedLinearMethod, linear_picker

# HF ``quantization_config.quant_method`` -> config class.
QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {
    cls.get_name(): cls for cls in (GPTQConfig, AWQConfig, CompressedTensorsConfig, Fp8Config, GGUFConfig,
                                     SqueezeLLMConfig)
}
_ALIASES = {"compressed_tensors": "compressed-tensors"}


def _normalize(name: Any) -> str:
    name = str(name).lower()
    return _ALIASES.get(name, name)


def checkpoint_quantization(hf_config: Any) -> Optional[dict[str, Any]]:
    """The checkpoint's ``quantization_config`` as a dict, or None."""
    qc = getattr(hf_config, "quantization_config", None)
    if not qc:
        return None
    return dict(qc) if isinstance(qc, dict) else qc.to_dict()


def resolve_quantization(quantization: Optional[str], hf_config: Any,
                         load_format: str = "safetensors") -> Optional[str]:
    """The method the model is loaded with (None: unquantized), from the user's ``quantization`` and
    the checkpoint's ``quantization_config``. ValueError naming the setting when they disagree, when
    the method is unknown, or when a GGUF file is given a method other than "gguf" (kept quantized) or
    one that quantizes at load (its dequantized weights).
    With ``load_format="dummy"`` any method may be asked for: random weights in its ``dummy_config``."""
    supported = ", ".join(sorted(QUANTIZATION_METHODS))
    qc = checkpoint_quantization(hf_config)
    if load_format == "gguf" or quantization == "gguf":
        if load_format != "gguf":
            raise ValueError("quantization='gguf' needs a GGUF file.")
        name = _normalize(quantization) if quantization is not None else None
        if name not in (None, "gguf") and not (name in QUANTIZATION_METHODS and
                                               QUANTIZATION_METHODS[name].quantizes_at_load()):
            raise ValueError(f"quantization={quantization!r} cannot be applied to a GGUF file: its tensors carry "
                             "their own quantization (unset: dequantized at load; 'gguf': kept quantized; 'fp8': "
                             "the dequantized weights quantized to FP8).")
        return name
    ckpt = _normalize(qc.get("quant_method", "")) if qc else None
    if ckpt is not None and ckpt not in QUANTIZATION_METHODS:
        raise ValueError(f"The checkpoint's quantization_config.quant_method={ckpt!r} is not supported "
                         f"(supported: {supported}).")
    if quantization is None:
        return ckpt
    name = _normalize(quantization)
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization={quantization!r} is not supported (supported: {supported}).")
    if ckpt is None and not QUANTIZATION_METHODS[name].quantizes_at_load() and load_format != "dummy":
        raise ValueError(f"quantization={quantization!r} needs a {name} checkpoint, but the model's config.json "
                         "has no quantization_config.")
    if ckpt is not None and ckpt != name:
        raise ValueError(f"quantization={quantization!r} does not match the checkpoint's "
                         f"quantization_config.quant_method={ckpt!r}.")
    return name


def get_quant_config(hf_config: Any, device: Optional[torch.device] = None,
                     quantization: Optional[str] = None) -> QuantizationConfig:
    """The ``QuantizationConfig`` for a model on ``device``: ``quantization`` (a name checked by
    ``resolve_quantization`` at engine start; None: the checkpoint's own, if any), built from the
    checkpoint's ``quantization_config`` (empty for a method that quantizes at load; the method's
    ``dummy_config`` for dummy weights). ValueError naming the field for settings it cannot serve."""
    name = resolve_quantization(quantization, hf_config, "dummy")
    if name is None:
        return UnquantizedConfig(device)
    cls = QUANTIZATION_METHODS[name]
    qc = checkpoint_quantization(hf_config)
    if qc is None and not cls.quantizes_at_load():  # dummy weights (resolve_quantization checked)
        qc = cls.dummy_config()
    return cls.from_config(qc or {}, device)


__all__ = ["LinearMethodBase", "QUANTIZATION_METHODS", "QuantizationConfig", "UnquantizedConfig",
           "UnquantizedLinearMethod", "checkpoint_quantization", "get_quant_config", "linear_picker",
           "resolve_quantization"]
