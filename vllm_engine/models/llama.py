"""One Llama-family decoder: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Yi.

What differs between them is read from the HF config:

* GQA/MQA: ``num_key_value_heads``; ``head_dim`` from the config when given (Qwen3), else hidden / heads.
* rope: ``rope_theta`` and ``rope_scaling`` (llama3, linear), transformers 4.x or 5.x spelling.
* Qwen2: bias on q/k/v (not o); Llama ``attention_bias``: bias on q/k/v and o; ``mlp_bias``.
* Qwen3: RMSNorm over each head of q and k before rope.
* Mistral: sliding-window attention when ``sliding_window`` is set (Qwen2/3 only with ``use_sliding_window``).
* ``tie_word_embeddings``: the LM head shares the embedding matrix.

Parameters keep HF names except for two fused matrices: ``qkv_proj`` (q | k | v rows) and
``gate_up_proj`` (gate | up rows), filled shard by shard from the HF tensors by ``load_weights``.
Parameters are created uninitialised (``torch.empty``): the loader fills every one of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vllm_engine.attention.backend import AttentionBackend, AttentionMetadata
from vllm_engine.layers import activation, layernorm
from vllm_engine.layers.rotary import RotaryEmbedding, apply_rotary


# ---- swappable elementwise ops (torch on CPU, fused Triton kernels on CUDA) ------------------------
@dataclass(frozen=True)
class Ops:
    """``rms_norm(x, w, eps) -> y``; ``fused_add_rms_norm(x, residual, w, eps) -> (y, x + residual)``;
    ``silu_and_mul(x[..., 2d]) -> [..., d]``; ``rotary(positions[T], q[T, h, d], k[T, kv, d],
    cos_sin_cache[max_pos, rotary_dim] float32, rotary_dim) -> (q, k)`` (neox style). All return ``x.dtype``.
    ``qkv_rope_cache(positions, qkv, heads, kv_heads, cos_sin_cache, rotary_dim, q_norm_w, k_norm_w, eps,
    kv_cache, slot_mapping) -> q``: q/k norm (when the weights are given), rotary, and the K/V cache
    write in one pass (see fused_ops.qkv_rope_cache). ``linear(x, w, b)``: F.linear (on CUDA a
    ``layers.linear.LinearPicker``: cuBLAS or a Triton GEMV/GEMM per shape, whichever measures faster).
    ``add_norm_linear(x, residual, norm_w, eps, w, b) -> (linear(rms_norm(x + residual)), x + residual)``:
    None composes ``fused_add_rms_norm`` and ``linear``; on CUDA the picker's, which may fold the norm
    into a GEMV (``norm_linear`` calls whichever is set). ``silu_mul_linear(gate_up, w, b)``: the same
    for the activation before the down projection (``act_linear``)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    fused_add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    qkv_rope_cache: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor] = F.linear
    add_norm_linear: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None
    silu_mul_linear: Optional[Callable[..., torch.Tensor]] = None

    def norm_linear(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and RMSNorm before a projection, and the projection."""
        if self.add_norm_linear is not None:
            return self.add_norm_linear(x, residual, norm_weight, eps, weight, bias)
        h, residual = self.fused_add_rms_norm(x, residual, norm_weight, eps)
        return self.linear(h, weight, bias), residual

    def act_linear(self, gate_up: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """SiLU-and-mul of [gate | up], then the down projection."""
        if self.silu_mul_linear is not None:
            return self.silu_mul_linear(gate_up, weight, bias)
        return self.linear(self.silu_and_mul(gate_up), weight, bias)


def _torch_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return layernorm.rms_norm(x, w, eps)


def _torch_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return layernorm.rms_norm(x, w, eps, residual)


def _torch_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                  rotary_dim: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    return apply_rotary(q, cos, sin, rotary_dim), apply_rotary(k, cos, sin, rotary_dim)


def _torch_qkv_rope_cache(*args) -> torch.Tensor:
    from vllm_engine.layers.fused_ops import torch_qkv_rope_cache

    return torch_qkv_rope_cache(*args)


TORCH_OPS = Ops(_torch_rms_norm, _torch_fused_add_rms_norm, activation.silu_and_mul, _torch_rotary,
                _torch_qkv_rope_cache)


def get_ops(device: torch.device) -> Ops:
    """Torch ops on CPU; on CUDA the fused Triton ops of ``vllm_engine.layers.fused_ops`` when importable."""
    if torch.device(device).type != "cuda":
        return TORCH_OPS
    try:
        from vllm_engine.layers import fused_ops
    except Exception:  # no Triton, or the module is absent: the torch ops are correct, just slower
        return TORCH_OPS
    picker = _linear_picker()
    fold = os.environ.get("VLLM_ENGINE_FOLD", "1") != "0"  # =0: no norm / activation folded into GEMVs (A/B runs)
    return Ops(
        getattr(fused_ops, "rms_norm", TORCH_OPS.rms_norm),
        getattr(fused_ops, "fused_add_rms_norm", TORCH_OPS.fused_add_rms_norm),
        getattr(fused_ops, "silu_and_mul", TORCH_OPS.silu_and_mul),
        getattr(fused_ops, "rotary", TORCH_OPS.rotary),
        getattr(fused_ops, "qkv_rope_cache", TORCH_OPS.qkv_rope_cache),
        picker,
        getattr(picker, "add_norm_linear", None) if fold else None,
        getattr(picker, "silu_mul_linear", None) if fold else None,
    )


def _linear_picker() -> Callable[..., torch.Tensor]:
    """cuBLAS or our Triton kernels per shape. For A/B benchmarks, VLLM_ENGINE_LINEAR=cublas forces
    cuBLAS, and =gemv our fastest GEMV config at 1-4 rows (the picker decides above)."""
    mode = os.environ.get("VLLM_ENGINE_LINEAR", "auto")
    if mode not in ("auto", "cublas", "gemv"):
        raise ValueError(f"VLLM_ENGINE_LINEAR={mode!r}: use 'auto' (time cuBLAS against our kernels), 'cublas' "
                         "or 'gemv'.")
    if mode == "cublas":
        return F.linear
    try:
        from vllm_engine.layers.linear import LinearPicker
    except Exception:  # pragma: no cover - no Triton: cuBLAS for everything
        return F.linear
    return LinearPicker(gemv_margin=-1.0 if mode == "gemv" else None)


# ---- config helpers ------------------------------------------------------------------------------
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


def layer_sliding_window(config: Any, layer_idx: int) -> Optional[int]:
    """The attention window of layer ``layer_idx`` (None: full attention)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return None
    return window


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


# ---- modules -------------------------------------------------------------------------------------
def make_rotary(config: Any, max_position: int) -> RotaryEmbedding:
    """One cos/sin cache, shared by every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta, scaling = rope_params(config)
    rotary_dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    return RotaryEmbedding(head_dim, max_position, theta, scaling, rotary_dim)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, ops: Ops,
                 rotary_emb: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.layer_idx = layer_idx
        self.sliding_window = layer_sliding_window(config, layer_idx)
        self.attn_backend = attn_backend
        self.ops = ops
        model_type = getattr(config, "model_type", "llama")
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias or model_type == "qwen2"
        o_bias = attention_bias and model_type != "qwen2"

        self.qkv_proj = nn.Module()
        self.qkv_proj.weight = _empty(self.q_size + 2 * self.kv_size, hidden, dtype=dtype)
        self.qkv_proj.bias = _empty(self.q_size + 2 * self.kv_size, dtype=dtype) if qkv_bias else None
        self.o_proj = nn.Module()
        self.o_proj.weight = _empty(hidden, self.q_size, dtype=dtype)
        self.o_proj.bias = _empty(hidden, dtype=dtype) if o_bias else None
        self.qk_norm = model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = nn.Module()
            self.q_norm.weight = _empty(self.head_dim, dtype=dtype)
            self.k_norm = nn.Module()
            self.k_norm.weight = _empty(self.head_dim, dtype=dtype)
        self.eps = config.rms_norm_eps
        # Not a submodule (shared): a plain attribute, so it is neither registered nor saved per layer.
        self.__dict__["rotary_emb"] = rotary_emb

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """positions: [T] int64; qkv: [T, (heads + 2 kv heads) * head_dim], the input already projected
        by ``qkv_proj`` (the decoder layer does it, with its norm) -> [T, hidden]."""
        t = qkv.shape[0]
        # q/k norm (Qwen3), rotary and the K/V cache write in one pass; the backend gets no key/value.
        q = self.ops.qkv_rope_cache(
            positions, qkv, self.num_heads, self.num_kv_heads, self.rotary_emb.cos_sin_cache,
            self.rotary_emb.rotary_dim, self.q_norm.weight if self.qk_norm else None,
            self.k_norm.weight if self.qk_norm else None, self.eps, kv_cache, attn_metadata.slot_mapping)
        out = self.attn_backend.forward(q, None, None, kv_cache, attn_metadata, self.scale, self.sliding_window)
        return self.ops.linear(out.reshape(t, self.q_size), self.o_proj.weight, self.o_proj.bias)


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, ops: Ops, dtype: torch.dtype) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"Unsupported hidden_act {act!r}: the Llama-family model supports silu.")
        bias = bool(getattr(config, "mlp_bias", False))
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Module()
        self.gate_up_proj.weight = _empty(2 * inter, hidden, dtype=dtype)
        self.gate_up_proj.bias = _empty(2 * inter, dtype=dtype) if bias else None
        self.down_proj = nn.Module()
        self.down_proj.weight = _empty(hidden, inter, dtype=dtype)
        self.down_proj.bias = _empty(hidden, dtype=dtype) if bias else None
        self.ops = ops

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: the input already projected by ``gate_up_proj`` (the decoder layer does it, with its norm)."""
        return self.ops.act_linear(gate_up, self.down_proj.weight, self.down_proj.bias)


class _Norm(nn.Module):
    def __init__(self, size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _empty(size, dtype=dtype)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attn_backend: AttentionBackend, ops: Ops,
                 rotary_emb: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, attn_backend, ops, rotary_emb, dtype)
        self.mlp = LlamaMLP(config, ops, dtype)
        self.input_layernorm = _Norm(config.hidden_size, dtype)
        self.post_attention_layernorm = _Norm(config.hidden_size, dtype)
        self.eps = config.rms_norm_eps
        self.ops = ops

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it): the next norm adds them.
        Each norm goes with the projection after it (``Ops.norm_linear``: one kernel where that is faster)."""
        qkv_proj, gate_up_proj = self.self_attn.qkv_proj, self.mlp.gate_up_proj
        if residual is None:
            residual = hidden
            qkv = self.ops.linear(self.ops.rms_norm(hidden, self.input_layernorm.weight, self.eps),
                                  qkv_proj.weight, qkv_proj.bias)
        else:
            qkv, residual = self.ops.norm_linear(hidden, residual, self.input_layernorm.weight, self.eps,
                                                 qkv_proj.weight, qkv_proj.bias)
        hidden = self.self_attn(positions, qkv, kv_cache, attn_metadata)
        gate_up, residual = self.ops.norm_linear(hidden, residual, self.post_attention_layernorm.weight, self.eps,
                                                 gate_up_proj.weight, gate_up_proj.bias)
        return self.mlp(gate_up), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, attn_backend: AttentionBackend, ops: Ops, max_position: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = _empty(config.vocab_size, config.hidden_size, dtype=dtype)
        self.rotary_emb = make_rotary(config, max_position)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, attn_backend, ops, self.rotary_emb, dtype)
            for i in range(config.num_hidden_layers)
        )
        self.norm = _Norm(config.hidden_size, dtype)
        self.eps = config.rms_norm_eps
        self.ops = ops

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.embed_tokens.weight)
        residual: Optional[torch.Tensor] = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual, kv_caches[i], attn_metadata)
        hidden, _ = self.ops.fused_add_rms_norm(hidden, residual, self.norm.weight, self.eps)
        return hidden


# (our fused parameter, the HF name of one shard, shard id)
STACKED_PARAMS: list[tuple[str, str, str]] = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", "gate"),
    ("gate_up_proj", "up_proj", "up"),
]


class LlamaForCausalLM(nn.Module):
    """``model(input_ids[T] int64, positions[T] int64, kv_caches, attn_metadata) -> hidden [T, hidden]``;
    ``compute_logits(hidden[N, hidden]) -> [N, vocab]`` in the model dtype (the sampler reads 16-bit
    logits directly where it can, and converts where it needs float32).

    ``kv_caches[i]``: layer i's paged cache ``[2, num_blocks, block_size, num_kv_heads, head_dim]``.
    """

    def __init__(self, config: Any, attn_backend: AttentionBackend, max_position: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, ops: Optional[Ops] = None) -> None:
        super().__init__()
        self.config = config
        max_position = max_position or getattr(config, "max_position_embeddings", None) or 2048
        self.ops = ops or TORCH_OPS
        self.model = LlamaModel(config, attn_backend, self.ops, max_position, dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Module()
            self.lm_head.weight = _empty(config.vocab_size, config.hidden_size, dtype=dtype)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.lm_head_weight)

    # ---- weights ---------------------------------------------------------------------------------
    def shard_slice(self, param_name: str, shard_id: str) -> tuple[int, int]:
        """(row offset, rows) of one HF shard inside a fused parameter."""
        attn = self.model.layers[0].self_attn
        if shard_id in ("q", "k", "v"):
            q, kv = attn.q_size, attn.kv_size
            return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        inter = self.config.intermediate_size
        return (0, inter) if shard_id == "gate" else (inter, inter)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our parameters (cast to their dtype/device); returns the names of
        the parameters filled. Unknown names raise ValueError; rotary inv_freq and a tied lm_head are skipped."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            for fused, hf, shard_id in STACKED_PARAMS:
                if f".{hf}." in name:
                    target = name.replace(f".{hf}.", f".{fused}.")
                    param = self._param(params, target, name)
                    offset, rows = self.shard_slice(fused, shard_id)
                    if param.dim() == 0 or tensor.shape[0] != rows or tensor.shape[1:] != param.shape[1:]:
                        raise ValueError(f"Weight {name} has shape {tuple(tensor.shape)}, expected "
                                         f"({rows}, {', '.join(map(str, param.shape[1:]))}).")
                    param.data.narrow(0, offset, rows).copy_(tensor)
                    loaded.add(f"{target}#{shard_id}")
                    break
            else:
                param = self._param(params, name, name)
                if tensor.shape != param.shape:
                    raise ValueError(f"Weight {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}.")
                param.data.copy_(tensor)
                loaded.add(name)
        return loaded

    @staticmethod
    def _param(params: dict[str, nn.Parameter], target: str, source: str) -> nn.Parameter:
        param = params.get(target)
        if param is None:
            raise ValueError(f"Checkpoint tensor {source!r} matches no parameter of the model.")
        return param

    def expected_weights(self) -> set[str]:
        """What ``load_weights`` must report for a complete checkpoint."""
        names: set[str] = set()
        for name, _ in self.named_parameters():
            shards = [f"{name}#{shard_id}" for fused, _hf, shard_id in STACKED_PARAMS if f".{fused}." in name]
            names.update(shards or [name])
        return names
