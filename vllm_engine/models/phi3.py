"""Phi-3 / Phi-3.5 (and Phi-4-mini): the Llama decoder with fused projections in the checkpoint and
LongRoPE.

The checkpoint stores ``self_attn.qkv_proj`` (q | k | v rows) and ``mlp.gate_up_proj`` (gate | up
rows) as single tensors; ``load_weights`` cuts them into the q/k/v and gate/up tensors the shared
layers' loaders take (each then keeps this rank's heads and columns, as for a Llama checkpoint).
Rope: ``longrope`` (short/long factors, attention factor: layers/rotary.py) or default, over
``partial_rotary_factor`` of each head; ``sliding_window`` when the config sets one (Phi-3-mini-4k:
2047). Everything else (RMSNorm, SiLU-and-mul, untied or tied head) is Llama's.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from vllm_engine.models import utils
from vllm_engine.models.llama import LlamaForCausalLM


def split_fused_tensors(weights: Iterable[tuple[str, torch.Tensor]], config: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """``...qkv_proj.weight`` -> q/k/v_proj tensors and ``...gate_up_proj.weight`` -> gate/up_proj
    (rows in that order); other tensors pass through. ValueError naming the tensor when its rows do
    not match the config's head and intermediate sizes."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = utils.head_dim(config)
    qkv_rows = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    gate_up_rows = [config.intermediate_size, config.intermediate_size]
    for name, tensor in weights:
        for fused, parts, rows in ((".qkv_proj.", ("q_proj", "k_proj", "v_proj"), qkv_rows),
                                   (".gate_up_proj.", ("gate_proj", "up_proj"), gate_up_rows)):
            if fused in name:
                if tensor.shape[0] != sum(rows):
                    raise ValueError(f"Weight {name} has {tensor.shape[0]} rows, expected {sum(rows)} "
                                     f"({' + '.join(map(str, rows))}).")
                for part, chunk in zip(parts, tensor.split(rows, dim=0)):
                    yield name.replace(fused, f".{part}."), chunk
                break
        else:
            yield name, tensor


class Phi3ForCausalLM(LlamaForCausalLM):
    """``Phi3ForCausalLM``: Llama's model and head; the checkpoint's fused tensors split on loading."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Unsupported hidden_act {act!r}: Phi-3 supports silu.")
        super().__init__(config, *args, **kwargs)

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        return split_fused_tensors(weights, self.config)
