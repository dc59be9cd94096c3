"""Settings a family does not implement are refused when the model is built, with a ValueError that
names the config field: an unknown rope type, an activation the family lacks."""

from __future__ import annotations

import pytest

from tests.models import test_deepseek, test_gemma, test_gpt2_neox, test_moe, test_phi3
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.models.registry import get_model_class

CONFIGS = {
    "gemma": lambda tiny: test_gemma.gemma_config("gemma", tiny),
    "gemma2": lambda tiny: test_gemma.gemma_config("gemma2", tiny),
    "gemma3": lambda tiny: test_gemma.gemma_config("gemma3", tiny),
    "phi3": lambda tiny: test_phi3.phi3_config("partial", tiny),
    "neox": lambda tiny: test_gpt2_neox.family_config("neox", tiny),
    "mixtral": lambda tiny: test_moe.moe_config("mixtral", tiny),
    "qwen2_moe": lambda tiny: test_moe.moe_config("qwen2_moe", tiny),
    "qwen3_moe": lambda tiny: test_moe.moe_config("qwen3_moe", tiny),
    "deepseek_v2": lambda tiny: test_deepseek.deepseek_config("v2", tiny),
    "deepseek_v3": lambda tiny: test_deepseek.deepseek_config("v3", tiny),
}
ACTIVATION_FIELD = {"gemma2": "hidden_activation", "gemma3": "hidden_activation"}  # Gemma 1: hidden_act


def _build(config):
    return get_model_class(config.architectures[0])(config, TorchAttentionBackend(), max_position=64)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_unknown_rope_type_is_refused(family, tiny_model_dir):
    config = CONFIGS[family](tiny_model_dir("llama"))
    params = config.rope_parameters
    if "full_attention" in params:  # Gemma 3: one per layer type
        params["full_attention"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    else:
        config.rope_parameters = {**params, "rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic'"):
        _build(config)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_an_activation_the_family_lacks_is_refused(family, tiny_model_dir):
    config = CONFIGS[family](tiny_model_dir("llama"))
    field = ACTIVATION_FIELD.get(family, "hidden_act")
    setattr(config, field, "mish")
    with pytest.raises(ValueError, match=f"{field} 'mish'"):
        _build(config)
