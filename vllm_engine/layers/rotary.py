"""Rotary position embedding (neox style, as HF Llama: rotate the two halves of each head).

The cos/sin cache is built once for ``max_position`` positions in float32; ``rope_scaling``
supports the ``llama3`` frequency scaling (Llama 3.1+), ``linear`` position interpolation,
``yarn`` (DeepSeek-V2/V3, Qwen long context: interpolated low frequencies, extrapolated high ones,
a ramp between, an attention factor on cos and sin) and ``longrope`` (Phi-3/3.5: per-frequency
short/long factors and an attention factor); ``default``/None leaves the frequencies alone.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn


def compute_inv_freq(rotary_dim: int, base: float, rope_scaling: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] (float32), after ``rope_scaling``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    kind = _rope_type(rope_scaling)
    if kind in ("default", None):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if kind == "llama3":
        factor = float(rope_scaling["factor"])
        low_freq_factor = float(rope_scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(rope_scaling.get("high_freq_factor", 4.0))
        old_len = float(rope_scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = old_len / low_freq_factor
        high_freq_wavelen = old_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, rotary_dim, base, rope_scaling)
    raise ValueError(
        f"Unsupported rope_scaling type {kind!r}; supported: default, linear, llama3, yarn, longrope."
    )


def _yarn_inv_freq(inv_freq: torch.Tensor, rotary_dim: int, base: float, rope_scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: frequency i is ``inv_freq_i / factor`` (interpolated) below the dimension that turns
    ``beta_slow`` times over the original context, ``inv_freq_i`` (extrapolated) above the one that
    turns ``beta_fast`` times, linearly blended between (bounds floored / ceiled unless ``truncate``
    is false)."""
    factor = float(rope_scaling["factor"])
    original = float(rope_scaling["original_max_position_embeddings"])
    beta_fast = float(rope_scaling.get("beta_fast") or 32)
    beta_slow = float(rope_scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dimension whose frequency turns ``rotations`` times
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp
    return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 mscale ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(rope_scaling: Optional[dict[str, Any]]) -> float:
    """What cos and sin are multiplied by: YaRN's ``attention_factor``, else mscale(factor, mscale) /
    mscale(factor, mscale_all_dim) when both are given (DeepSeek), else mscale(factor); 1 otherwise."""
    if _rope_type(rope_scaling) != "yarn":
        return 1.0
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    factor = float(rope_scaling["factor"])
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def _rope_type(rope_scaling: Optional[dict[str, Any]]) -> Optional[str]:
    if not rope_scaling:
        return None
    return rope_scaling.get("rope_type", rope_scaling.get("type"))


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: Optional[int] = None
) -> torch.Tensor:
    """Rotate x: [T, heads, head_dim] with cos/sin: [T, rotary_dim // 2] (neox style).

    Computed in float32 and returned in ``x.dtype``; dims past ``rotary_dim`` pass through.
    """
    head_dim = x.shape[-1]
    rotary_dim = rotary_dim or head_dim
    x_rot = x[..., :rotary_dim].float()
    half = rotary_dim // 2
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    cos = cos.unsqueeze(-2).float()
    sin = sin.unsqueeze(-2).float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if rotary_dim < head_dim:
        out = torch.cat((out, x[..., rotary_dim:]), dim=-1)
    return out


class RotaryEmbedding(nn.Module):
    """The cos | sin table ``cos_sin_cache`` [max_position, rotary_dim] (float32) of ``rotary_dim``
    dims per head (the rest pass through). One per model, shared by every layer's ``Attention``,
    whose fused pass (``fused_ops.qkv_rope_cache``) applies it; ``apply_rotary`` above is the torch
    computation."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float = 10000.0,
        rope_scaling: Optional[dict[str, Any]] = None,
        rotary_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        # [max_position, rotary_dim]: cos | sin; non-persistent so state_dict stays HF-shaped.
        self.register_buffer("cos_sin_cache", self._cos_sin(max_position, base, rope_scaling), persistent=False)

    def _cos_sin(self, max_position: int, base: float, rope_scaling: Optional[dict[str, Any]]) -> torch.Tensor:
        inv_freq = compute_inv_freq(self.rotary_dim, base, rope_scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [max_position, rotary_dim // 2]
        scale = rope_attention_factor(rope_scaling)
        return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)

    def _apply(self, fn, recurse=True):
        # Keep the cache in float32 when the model is cast to a 16-bit dtype.
        cache = self.cos_sin_cache
        out = super()._apply(fn, recurse)
        if self.cos_sin_cache.dtype != torch.float32:
            self.cos_sin_cache = cache.to(self.cos_sin_cache.device, torch.float32)
        return out


class LongRoPERotaryEmbedding(RotaryEmbedding):
    """LongRoPE (Phi-3 / Phi-3.5): inverse frequencies ``1 / (ext_factor_i * base^(2i / d))`` with
    ``short_factor`` for positions below ``original_max_position_embeddings`` and ``long_factor`` from
    there on, cos and sin multiplied by the attention factor (``attention_factor``, else
    sqrt(1 + ln(factor) / ln(original_max)) for factor = ``factor`` or max_position_embeddings /
    original_max, 1 when factor <= 1).

    HF picks one factor set per forward, long when the longest position in it reaches the original
    context; the table here picks per position, so a token's rotation never depends on what else is in
    the batch. Both agree on every sequence shorter than ``original_max_position_embeddings``; a longer
    prompt gets short factors on its first ``original_max`` positions where HF's prefill uses long ones
    (HF's own decode past that point then mixes the two sets in its cache the same way).
    """

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any],
                 rotary_dim: Optional[int], max_position_embeddings: int,
                 original_max_position_embeddings: int) -> None:
        self.original_max = int(original_max_position_embeddings)
        self.max_position_embeddings = int(max_position_embeddings)
        super().__init__(head_dim, max_position, base, rope_scaling, rotary_dim)

    def _cos_sin(self, max_position: int, base: float, rope_scaling: Optional[dict[str, Any]]) -> torch.Tensor:
        half = self.rotary_dim // 2
        factors = {}
        for key in ("short_factor", "long_factor"):
            f = torch.tensor(rope_scaling[key], dtype=torch.float32)
            if f.shape != (half,):
                raise ValueError(f"rope_scaling {key} has {f.numel()} entries, expected rotary_dim / 2 = {half}")
            factors[key] = f
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        t = torch.arange(max_position, dtype=torch.float32)
        short = torch.outer(t, 1.0 / (factors["short_factor"] * base ** exponents))
        long = torch.outer(t, 1.0 / (factors["long_factor"] * base ** exponents))
        freqs = torch.where((t >= self.original_max)[:, None], long, short)
        scale = self._attention_factor(rope_scaling)
        return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)

    def _attention_factor(self, rope_scaling: dict[str, Any]) -> float:
        if rope_scaling.get("attention_factor") is not None:
            return float(rope_scaling["attention_factor"])
        factor = rope_scaling.get("factor") or self.max_position_embeddings / self.original_max
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max))


def rope_params(config: Any) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) from a transformers 4.x (rope_theta/rope_scaling) or 5.x
    (rope_parameters) config."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        return theta, (None if kind in (None, "default") else dict(params))
    theta = float(getattr(config, "rope_theta", None) or 10000.0)
    scaling = getattr(config, "rope_scaling", None) or None
    return theta, scaling


def partial_rotary_factor(config: Any) -> float:
    """The fraction of each head that is rotated: ``partial_rotary_factor`` on the config (4.x) or in
    ``rope_parameters`` (5.x), else 1."""
    factor = getattr(config, "partial_rotary_factor", None)
    params = getattr(config, "rope_parameters", None)
    if factor is None and isinstance(params, dict):
        factor = params.get("partial_rotary_factor")
    return float(factor) if factor is not None else 1.0


def get_rope(config: Any, head_dim: int, max_position: int) -> RotaryEmbedding:
    """The rotary embedding an HF config describes (theta, scaling, ``partial_rotary_factor``): one
    cos/sin cache, shared by every layer."""
    theta, scaling = rope_params(config)
    rotary_dim = int(head_dim * partial_rotary_factor(config))
    if _rope_type(scaling) == "longrope":
        original = scaling.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None)
        if not original:
            raise ValueError("rope_scaling longrope needs original_max_position_embeddings.")
        return LongRoPERotaryEmbedding(head_dim, max_position, theta, scaling, rotary_dim,
                                       config.max_position_embeddings, original)
    return RotaryEmbedding(head_dim, max_position, theta, scaling, rotary_dim)
