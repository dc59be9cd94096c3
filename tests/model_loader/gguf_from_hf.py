"""Writes a tiny HF checkpoint as a GGUF file the way llama.cpp's converter lays it out, for the loader
tests: tensor names from the ``gguf`` package's own map (``gguf.get_tensor_name_map``), metadata
through ``GGUFWriter``'s ``add_*`` methods, and the converter's tensor changes (llama's q/k row
permutation, Gemma's 1 + w norm gains, GPT-2's transposed Conv1D weights, GPT-NeoX's q | k | v
regrouping, experts stacked per projection). Tensors are F32, F16 or Q8_0 (``gguf.quants.quantize``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaving of q/k rows (rotary pairs side by side)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch_enum(arch: str):
    from gguf.constants import MODEL_ARCH_NAMES

    return next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)


def _deepseek_metadata(w: Any, cfg: Any, absorbed: bool = True) -> None:
    """DeepSeek-V2/V3: latent attention as one KV head of kv_lora_rank + rope dims (llama.cpp's MQA
    view), the per-head sizes as the ``*_mla`` lengths, experts, routing, YaRN."""
    import gguf

    rope = cfg.qk_rope_head_dim
    if absorbed:
        w.add_head_count_kv(1)
        w.add_key_length(cfg.kv_lora_rank + rope)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_nope_head_dim + rope)
        w.add_value_length_mla(cfg.v_head_dim)
    else:  # the converter before the absorbed layout: per-head sizes, kv_b_proj whole
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.qk_nope_head_dim + rope)
        w.add_value_length(cfg.v_head_dim)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_rope_dimension_count(rope)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    sigmoid = cfg.model_type == "deepseek_v3"
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    if sigmoid or getattr(cfg, "topk_method", "greedy") == "group_limited_greedy":
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    rope_params = cfg.rope_parameters or {}
    w.add_rope_freq_base(rope_params.get("rope_theta", 10000.0))
    if rope_params.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope_params["factor"])
        w.add_rope_scaling_orig_ctx_len(rope_params["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope_params["mscale_all_dim"])


def _metadata(w: Any, arch: str, cfg: Any, absorbed: bool = True) -> None:
    """The hyperparameters llama.cpp's converter writes for ``arch``."""
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    if arch == "gptneox":
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
        w.add_parallel_residual(cfg.use_parallel_residual)
        return
    if arch == "gpt2":
        return
    if arch == "deepseek2":
        _deepseek_metadata(w, cfg, absorbed)
        return
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        if rope["full_attention"].get("rope_type") == "linear":
            from gguf import RopeScalingType

            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["full_attention"]["factor"])
    else:
        w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if arch in ("gemma2", "gemma3", "phi3") and getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "phi3":
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings or cfg.max_position_embeddings)
    num_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if num_experts:
        w.add_expert_count(num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def _converted(arch: str, cfg: Any, tensors: dict[str, torch.Tensor], absorbed: bool = True) -> dict[str, torch.Tensor]:
    """The converter's changes to the HF tensors (names still HF's; stacked experts under ``...experts``)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        t = t.float()
        if name.endswith((".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias")):
            continue
        if arch == "llama" and ".self_attn.q_proj." in name:
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        elif arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1.0
        elif arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.t().contiguous()
        elif arch == "gptneox" and ".query_key_value." in name:
            heads = cfg.num_attention_heads
            t = t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()
        elif arch == "deepseek2" and absorbed and name.endswith("kv_b_proj.weight"):  # MLA absorption
            kv = t.reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
            k_b, v_b = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            out[name.replace("kv_b_proj", "k_b_proj")] = k_b.transpose(1, 2).contiguous()
            out[name.replace("kv_b_proj", "v_b_proj")] = v_b.contiguous()
            continue
        elif name.endswith("e_score_correction_bias"):
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        m = _EXPERT.match(name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
            continue
        out[name] = t
    for (prefix, proj), by_index in experts.items():
        out[f"{prefix}.{proj}.weight"] = torch.stack([by_index[e] for e in sorted(by_index)])
    return out


def write_gguf(hf_dir: Path, out: Path, arch: str, qtype: str = "F32", absorbed: bool = True) -> Path:
    """``hf_dir``'s model.safetensors and config as a GGUF of ``arch``; 2-D and 3-D weights in ``qtype``
    (F32, F16, Q8_0), norms, biases and rope factors in F32. ``absorbed=False``: DeepSeek as the
    converter wrote it before the absorbed-MLA layout (kv_b_proj whole, per-head key/value lengths)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(hf_dir))
    tensors = _converted(arch, cfg, load_file(str(hf_dir / "model.safetensors")), absorbed)
    names = gguf.get_tensor_name_map(_arch_enum(arch), cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(out), arch)
    _metadata(w, arch, cfg, absorbed)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    for name, t in tensors.items():
        base, suffix = name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ValueError(f"the gguf package has no {arch} name for {name}")
        data = t.numpy()
        if data.ndim < 2 or qtype == "F32" or data.shape[-1] % 32:
            w.add_tensor(f"{gguf_name}.{suffix}", data.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(f"{gguf_name}.{suffix}", data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(f"{gguf_name}.{suffix}", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _round_trip(t: torch.Tensor, qtype: str) -> torch.Tensor:
    """``t`` through ``qtype`` and back, blocks along its last dimension (F32: unchanged)."""
    import gguf

    if t.ndim < 2 or qtype == "F32" or t.shape[-1] % 32:
        return t
    if qtype == "F16":
        return t.half().float()
    q = gguf.quants.quantize(t.numpy().astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy()).reshape(t.shape)


def exact_checkpoint(hf_dir: Path, out_dir: Path, arch: str, qtype: str) -> Path:
    """A copy of the HF checkpoint whose weights ``qtype`` represents exactly (each rounded as
    ``write_gguf`` will store it: GPT-2's Conv1D weights in their transposed layout), so HF on this
    checkpoint and we on its GGUF compute with the very same weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out_dir / f.name)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    for name, t in tensors.items():
        transposed = arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))
        t = t.float().t().contiguous() if transposed else t.float()
        t = _round_trip(t, qtype)
        tensors[name] = (t.t() if transposed else t).contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
