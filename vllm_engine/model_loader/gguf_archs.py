"""What each GGUF architecture means in HF terms: tensor names, config fields, and the changes
llama.cpp's converter made to tensors that we undo.

``general.architecture`` -> a ``GGUFArch``: the HF architecture and model type, the map from GGUF
tensor names (``blk.N.attn_q``) to HF checkpoint names (``model.layers.N.self_attn.q_proj``), the
config fields beyond the common ones, and ``convert`` (GGUF tensor -> HF tensors). The converter's
changes, undone here:

* llama / mistral (and Mixtral, a ``llama`` file with ``expert_count``): q/k rows permuted for
  interleaved rotary pairs (``unpermute_qk``);
* gemma, gemma2, gemma3: every RMSNorm gain stored as 1 + w (HF stores w);
* gpt2: Conv1D weights stored transposed ([out, in]);
* gptneox: the per-head interleaved query_key_value regrouped into q | k | v;
* MoE (Mixtral, qwen2moe, qwen3moe, deepseek2): each projection's experts stacked in one tensor
  ``ffn_{gate,up,down}_exps`` [experts, out, in], cut back into per-expert tensors;
* deepseek2: ``kv_b_proj`` split for absorbed MLA into ``attn_k_b`` (transposed) and ``attn_v_b``,
  joined back; the latent attention written as one KV head of kv_lora_rank + rope dims (the per-head
  sizes in ``attention.key_length_mla`` / ``value_length_mla``); sigmoid gating means V3.

Settings llama.cpp fixes in code rather than metadata are fixed here the same way: Gemma 2 layers
alternate sliding (even) and full (odd); Gemma 3 has a full layer every sixth (unless the file gives
``attention.sliding_window_pattern``), local rope base 10k (unless ``rope.freq_base_swa``); the
score scale is head_dim**-0.5 except for the 27B models (hidden / heads). Qwen3-MoE renormalizes its
top-k expert weights, Qwen2-MoE does not. DeepSeek's YaRN mscale comes from ``yarn_log_multiplier``
(0.1 x mscale_all_dim; mscale taken equal, as in the released models). Architectures GGUF has but we
do not map (starcoder, ...) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

Getter = Callable[..., Any]
Converted = Iterable[tuple[str, torch.Tensor]]

LLAMA_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Stacked experts: "*" is the expert index.
QWEN_MOE_LAYER = {**LLAMA_LAYER, "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.*.gate_proj",
                  "ffn_up_exps": "mlp.experts.*.up_proj", "ffn_down_exps": "mlp.experts.*.down_proj",
                  "ffn_gate_inp_shexp": "mlp.shared_expert_gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
                  "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj"}
MIXTRAL_LAYER = {**LLAMA_LAYER, "ffn_gate_inp": "block_sparse_moe.gate",
                 "ffn_gate_exps": "block_sparse_moe.experts.*.w1", "ffn_up_exps": "block_sparse_moe.experts.*.w3",
                 "ffn_down_exps": "block_sparse_moe.experts.*.w2"}
GEMMA2_LAYER = {**LLAMA_LAYER, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
PHI3_LAYER = {**LLAMA_LAYER, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
GPT2_LAYER = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
              "attn_norm": "ln_1", "ffn_norm": "ln_2"}
GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
            "output": "lm_head"}
NEOX_LAYER = {"attn_qkv": "attention.query_key_value", "attn_output": "attention.dense",
              "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}
NEOX_TOP = {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm", "output": "embed_out"}

# GGUF tensors that only carry config (read by the config builders), not weights.
CONFIG_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")


@dataclass(frozen=True)
class GGUFArch:
    """One GGUF ``general.architecture`` as an HF architecture."""

    architecture: str
    model_type: str
    layer_prefix: str = "model.layers"
    layer_names: dict[str, str] = field(default_factory=lambda: LLAMA_LAYER)
    top_names: dict[str, str] = field(default_factory=lambda: LLAMA_TOP)
    # (get, common config kwargs, tensors by name) -> the config kwargs of this architecture.
    config: Optional[Callable[[Getter, dict, dict], dict]] = None
    # (HF name, tensor, hf_config, pending) -> the HF tensors it holds (undoing the converter's changes);
    # ``pending``: one dict per file, for tensors that come in parts (DeepSeek's k_b and v_b).
    convert: Optional[Callable[[str, torch.Tensor, Any, dict], Converted]] = None

    def hf_name(self, gguf_name: str) -> Optional[str]:
        """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for unknown names."""
        base, _, suffix = gguf_name.rpartition(".")
        if base.startswith("blk."):
            _, layer, part = base.split(".", 2)
            mapped = self.layer_names.get(part)
            return f"{self.layer_prefix}.{layer}.{mapped}.{suffix}" if mapped else None
        mapped = self.top_names.get(base)
        return f"{mapped}.{suffix}" if mapped else None


# ---- tensor conversions ------------------------------------------------------------------------------
def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a q/k weight [n_heads * head_dim, ...] (or bias)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def split_experts(name: str, w: torch.Tensor) -> Converted:
    """``...experts.*.gate_proj.weight`` [experts, out, in] -> one tensor per expert."""
    for e in range(w.shape[0]):
        yield name.replace(".*.", f".{e}."), w[e]


def convert_llama(name: str, w: torch.Tensor, cfg: Any, pending: Optional[dict] = None) -> Converted:
    if ".self_attn.q_proj." in name:
        w = unpermute_qk(w, cfg.num_attention_heads)
    elif ".self_attn.k_proj." in name:
        w = unpermute_qk(w, cfg.num_key_value_heads)
    return convert_moe(name, w, cfg, pending)


def convert_moe(name: str, w: torch.Tensor, cfg: Any, pending: Optional[dict] = None) -> Converted:
    if ".*." in name:
        return split_experts(name, w)
    if name.endswith("shared_expert_gate.weight"):
        w = w.reshape(1, -1)  # [hidden] or [1, hidden] in the file
    return [(name, w)]


def convert_gemma(name: str, w: torch.Tensor, cfg: Any, pending: Optional[dict] = None) -> Converted:
    return [(name, w - 1.0 if name.endswith("norm.weight") else w)]


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def convert_gpt2(name: str, w: torch.Tensor, cfg: Any, pending: Optional[dict] = None) -> Converted:
    return [(name, w.t().contiguous() if name.endswith(_CONV1D) else w)]


def convert_gpt_neox(name: str, w: torch.Tensor, cfg: Any, pending: Optional[dict] = None) -> Converted:
    """q | k | v rows (the file) -> each head's q, k, v rows in turn (HF's query_key_value)."""
    if ".query_key_value." in name:
        heads = cfg.num_attention_heads
        rest = w.shape[1:]
        w = w.reshape(3, heads, w.shape[0] // 3 // heads, *rest).transpose(0, 1).reshape(w.shape).contiguous()
    return [(name, w)]


def convert_deepseek(name: str, w: torch.Tensor, cfg: Any, pending: Optional[dict] = None) -> Converted:
    """Stacked experts cut; ``e_score_correction.bias`` renamed; the absorbed-MLA halves ``k_b_proj``
    ([heads, kv_lora_rank, qk_nope], transposed) and ``v_b_proj`` ([heads, v_head_dim, kv_lora_rank])
    joined back into HF's ``kv_b_proj`` [heads * (qk_nope + v_head_dim), kv_lora_rank] once both came."""
    if name.endswith(".e_score_correction.bias"):
        return [(name.replace(".e_score_correction.bias", ".e_score_correction_bias"), w)]
    for half in (".k_b_proj.", ".v_b_proj."):
        if half in name:
            pending = pending if pending is not None else {}
            kv_name = name.replace(half, ".kv_b_proj.")
            parts = pending.setdefault(kv_name, {})
            heads = cfg.num_attention_heads
            parts[half] = w.reshape(heads, -1, cfg.kv_lora_rank) if half == ".v_b_proj." else \
                w.reshape(heads, cfg.kv_lora_rank, -1).transpose(1, 2)
            if len(parts) < 2:
                return []
            del pending[kv_name]
            kv = torch.cat((parts[".k_b_proj."], parts[".v_b_proj."]), dim=1)
            return [(kv_name, kv.reshape(-1, cfg.kv_lora_rank).contiguous())]
    return convert_moe(name, w, cfg, pending)


# ---- config ----------------------------------------------------------------------------------------
def _query_scalar(kw: dict, layers_27b: int) -> float:
    """Gemma 2/3's query_pre_attn_scalar: hidden / heads for the 27B models, else head_dim (llama.cpp's rule)."""
    if kw["num_hidden_layers"] == layers_27b:
        return kw["hidden_size"] // kw["num_attention_heads"]
    return kw["head_dim"]


def gemma_config(get: Getter, kw: dict, tensors: dict) -> dict:
    return {**kw, "hidden_act": "gelu_pytorch_tanh"}


def gemma2_config(get: Getter, kw: dict, tensors: dict) -> dict:
    n = kw["num_hidden_layers"]
    return {**kw, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": _query_scalar(kw, 46),
            "sliding_window": int(get("attention.sliding_window")),
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
            "attn_logit_softcapping": get("attn_logit_softcapping", None, False),
            "final_logit_softcapping": get("final_logit_softcapping", None, False)}


def gemma3_config(get: Getter, kw: dict, tensors: dict) -> dict:
    n = kw["num_hidden_layers"]
    pattern = get("attention.sliding_window_pattern", 6, False)
    if isinstance(pattern, list):  # one flag per layer: sliding or not
        types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(n)]
    full = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    scaling = kw.pop("rope_scaling", None)
    if scaling:
        full.update(scaling)
    return {**kw, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": _query_scalar(kw, 62),
            "sliding_window": int(get("attention.sliding_window")), "layer_types": types,
            "rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default",
                                                      "rope_theta": float(get("rope.freq_base_swa", 10_000.0, False))}}}


def phi3_config(get: Getter, kw: dict, tensors: dict) -> dict:
    out = dict(kw)
    rot = get("rope.dimension_count", None, False)
    if rot and int(rot) != kw["head_dim"]:
        out["partial_rotary_factor"] = int(rot) / kw["head_dim"]
    original = get("rope.scaling.original_context_length", None, False)
    if original:
        out["original_max_position_embeddings"] = int(original)
    if "rope_factors_long.weight" in tensors:
        from vllm_engine.model_loader.gguf_loader import dequantize

        factors = {}
        for k in ("long", "short"):
            t = tensors[f"rope_factors_{k}.weight"]
            factors[k] = dequantize(t.data, t.type_name, t.shape).tolist()
        out["rope_scaling"] = {"rope_type": "longrope", "long_factor": factors["long"],
                               "short_factor": factors["short"]}
    return out


def qwen_moe_config(norm_topk_prob: bool) -> Callable[[Getter, dict, dict], dict]:
    """Qwen2-MoE / Qwen3-MoE experts; llama.cpp renormalizes the top-k weights for Qwen3-MoE only."""
    return lambda get, kw, tensors: moe_config(get, {**kw, "norm_topk_prob": norm_topk_prob}, tensors)


def moe_config(get: Getter, kw: dict, tensors: dict) -> dict:
    out = {**kw, "num_experts": int(get("expert_count")), "num_experts_per_tok": int(get("expert_used_count")),
           "moe_intermediate_size": int(get("expert_feed_forward_length"))}
    shared = get("expert_shared_feed_forward_length", None, False)
    if shared:
        out["shared_expert_intermediate_size"] = int(shared)
    return out


def mixtral_config(get: Getter, kw: dict, tensors: dict) -> dict:
    return {**kw, "num_local_experts": int(get("expert_count")), "num_experts_per_tok": int(get("expert_used_count"))}


def gpt2_config(get: Getter, kw: dict, tensors: dict) -> dict:
    """GPT-2's own field names (n_embd, n_layer, ...)."""
    keep = ("architectures", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    return {**{k: kw[k] for k in keep if k in kw}, "n_embd": kw["hidden_size"], "n_layer": kw["num_hidden_layers"],
            "n_head": kw["num_attention_heads"], "n_inner": kw["intermediate_size"],
            "n_positions": kw["max_position_embeddings"],
            "layer_norm_epsilon": float(get("attention.layer_norm_epsilon", 1e-5))}


def gpt_neox_config(get: Getter, kw: dict, tensors: dict) -> dict:
    head_dim = kw["hidden_size"] // kw["num_attention_heads"]
    rot = int(get("rope.dimension_count", head_dim, False))
    drop = ("rms_norm_eps", "num_key_value_heads", "head_dim", "rope_theta")
    return {**{k: v for k, v in kw.items() if k not in drop},
            "layer_norm_eps": float(get("attention.layer_norm_epsilon")), "rotary_pct": rot / head_dim,
            "rotary_emb_base": kw["rope_theta"], "hidden_act": "gelu",
            "use_parallel_residual": bool(get("use_parallel_residual", True, False))}


def deepseek2_config(get: Getter, kw: dict, tensors: dict) -> dict:
    """DeepSeek-V2 / V3 (sigmoid gating: V3): llama.cpp writes MLA as one KV head of kv_lora_rank +
    rope dims; the per-head sizes are the ``*_mla`` lengths."""
    rope = int(get("rope.dimension_count"))
    # Files from before the absorbed-MLA layout (attn_kv_b whole) give the per-head sizes as key/value_length.
    key_length = get("attention.key_length_mla", None, False) or get("attention.key_length")
    value_length = get("attention.value_length_mla", None, False) or get("attention.value_length")
    groups = int(get("expert_group_count", 1, False))
    v3 = int(get("expert_gating_func", 1, False)) == 2
    out = {k: v for k, v in kw.items() if k not in ("head_dim", "rope_scaling", "sliding_window")}
    out.update(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        num_key_value_heads=kw["num_attention_heads"], kv_lora_rank=int(get("attention.kv_lora_rank")),
        q_lora_rank=get("attention.q_lora_rank", None, False), qk_rope_head_dim=rope,
        qk_nope_head_dim=int(key_length) - rope, v_head_dim=int(value_length),
        n_routed_experts=int(get("expert_count")), n_shared_experts=int(get("expert_shared_count", 0, False)),
        num_experts_per_tok=int(get("expert_used_count")), moe_intermediate_size=int(get("expert_feed_forward_length")),
        first_k_dense_replace=int(get("leading_dense_block_count", 0, False)),
        routed_scaling_factor=float(get("expert_weights_scale", 1.0, False)),
        norm_topk_prob=bool(get("expert_weights_norm", False, False)), n_group=groups,
        topk_group=int(get("expert_group_used_count", groups, False)))
    if v3:
        out["model_type"] = "deepseek_v3"
    else:
        out["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"
    if get("rope.scaling.type", None, False) == "yarn":
        mscale = float(get("rope.scaling.yarn_log_multiplier", 0.0, False)) / 0.1
        out["rope_parameters"] = {
            "rope_type": "yarn", "rope_theta": kw["rope_theta"], "factor": float(get("rope.scaling.factor")),
            "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
            "beta_fast": float(get("rope.scaling.yarn_beta_fast", 32.0, False)),
            "beta_slow": float(get("rope.scaling.yarn_beta_slow", 1.0, False)), "mscale": mscale,
            "mscale_all_dim": mscale}
        del out["rope_theta"]
    return out


DEEPSEEK2_LAYER = {
    **LLAMA_LAYER, "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj", "attn_k_b": "self_attn.k_b_proj",
    "attn_v_b": "self_attn.v_b_proj", "ffn_gate_inp": "mlp.gate", "exp_probs_b": "mlp.gate.e_score_correction",
    "ffn_gate_exps": "mlp.experts.*.gate_proj", "ffn_up_exps": "mlp.experts.*.up_proj",
    "ffn_down_exps": "mlp.experts.*.down_proj", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj"}

GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", convert=convert_llama),
    "mistral": GGUFArch("MistralForCausalLM", "mistral", convert=convert_llama),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2"),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3"),
    "gemma": GGUFArch("GemmaForCausalLM", "gemma", config=gemma_config, convert=convert_gemma),
    "gemma2": GGUFArch("Gemma2ForCausalLM", "gemma2", layer_names=GEMMA2_LAYER, config=gemma2_config,
                       convert=convert_gemma),
    "gemma3": GGUFArch("Gemma3ForCausalLM", "gemma3_text", layer_names=GEMMA2_LAYER, config=gemma3_config,
                       convert=convert_gemma),
    "phi3": GGUFArch("Phi3ForCausalLM", "phi3", layer_names=PHI3_LAYER, config=phi3_config),
    "qwen2moe": GGUFArch("Qwen2MoeForCausalLM", "qwen2_moe", layer_names=QWEN_MOE_LAYER,
                         config=qwen_moe_config(False), convert=convert_moe),
    "qwen3moe": GGUFArch("Qwen3MoeForCausalLM", "qwen3_moe", layer_names=QWEN_MOE_LAYER,
                         config=qwen_moe_config(True), convert=convert_moe),
    "gpt2": GGUFArch("GPT2LMHeadModel", "gpt2", "transformer.h", GPT2_LAYER, GPT2_TOP, gpt2_config, convert_gpt2),
    "gptneox": GGUFArch("GPTNeoXForCausalLM", "gpt_neox", "gpt_neox.layers", NEOX_LAYER, NEOX_TOP, gpt_neox_config,
                        convert_gpt_neox),
    "deepseek2": GGUFArch("DeepseekV2ForCausalLM", "deepseek_v2", layer_names=DEEPSEEK2_LAYER,
                          config=deepseek2_config, convert=convert_deepseek),
}
# A llama file with experts (expert_count > 0) is Mixtral.
MIXTRAL = GGUFArch("MixtralForCausalLM", "mixtral", layer_names=MIXTRAL_LAYER, config=mixtral_config,
                   convert=convert_llama)


def gguf_arch(meta: dict[str, Any]) -> GGUFArch:
    """The ``GGUFArch`` of a file's metadata; ValueError naming an architecture we cannot load."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"Unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCHS))} "
                         "(llama with experts: Mixtral).")
    if arch == "llama" and meta.get("llama.expert_count"):
        return MIXTRAL
    return GGUF_ARCHS[arch]
