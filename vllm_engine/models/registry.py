"""Architecture name (``config.architectures[0]``) -> model class."""

from __future__ import annotations

from torch import nn

from vllm_engine.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from vllm_engine.models.gemma import Gemma3ForConditionalGeneration, GemmaForCausalLM
from vllm_engine.models.gpt2 import GPT2LMHeadModel, GPTBigCodeForCausalLM
from vllm_engine.models.gpt_neox import GPTNeoXForCausalLM
from vllm_engine.models.llama import LlamaForCausalLM
from vllm_engine.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from vllm_engine.models.phi3 import Phi3ForCausalLM

# Every Llama-family decoder shares one implementation; the differences (qkv bias, q/k norm,
# sliding window, head_dim, rope scaling, tied embeddings) are read from the HF config.
_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "YiForCausalLM": LlamaForCausalLM,
    # Gemma 1/2/3 text: one implementation, the differences (sandwich norms, soft caps, q/k norm,
    # local/global rope) read from the config (models/gemma.py).
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,  # text-only: the language model
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "GPTBigCodeForCausalLM": GPTBigCodeForCausalLM,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
    # Mixtures of experts (models/moe.py, layers/fused_moe.py).
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    # Multi-head latent attention + DeepSeek's experts (models/deepseek.py).
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(arch: str) -> type[nn.Module]:
    """The class implementing ``arch``; ValueError naming the supported ones otherwise."""
    try:
        return _MODELS[arch]
    except KeyError:
        raise ValueError(
            f"Unsupported model architecture {arch!r}; supported: {', '.join(supported_architectures())}."
        ) from None
