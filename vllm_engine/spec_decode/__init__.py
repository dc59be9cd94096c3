"""Speculative decoding (docs/speculative_decoding.md): proposers, the rejection sampler, the config."""

from vllm_engine.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
