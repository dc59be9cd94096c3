"""Tiny quantized checkpoints for the quantization tests, and HF models holding their dequantized weights.

``float_checkpoint`` is a tiny Llama (hidden 128, MLP 256, 2 layers, 4 heads of 32, 2 KV heads) so
that every group size (32, 64, 128) divides every layer's inputs. Its linear weights are quantized
here by round-to-nearest and written in a format's layout:

* GPTQ (``write_gptq``): packed by ``gptq_pack``, a word-by-word loop written from the format's
  description (independent of the engine's vectorized packing); act order is a random permutation
  of each input's channels, shared by the modules that read the same input (q/k/v, gate/up), as
  GPTQ's Hessian order is.
* compressed-tensors (``write_compressed_tensors``): the ``compressed-tensors`` library applies the
  scheme, packs and saves; the reference weights come from its own decompression.

Each writer returns the dequantized weights {HF name: [out, in] float64}; ``hf_reference`` loads
the float checkpoint into HF transformers with those weights in place of the originals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import build_tiny_tokenizer, save_random_hf_model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
# Modules reading the same input share an act order.
INPUT_OF = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
            "self_attn.o_proj": "o", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "down"}


def build_float_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out_dir)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, rms_norm_eps=1e-6,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    save_random_hf_model(config, out_dir, seed)
    return out_dir


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, order: Optional[torch.Tensor],
                 min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of ``w`` [out, in] (float64) in groups of input channels: consecutive channels,
    or consecutive in ``order`` (act order). Returns (q [out, in] in [0, 2**bits), scales [G, out]
    (rounded to float16, as checkpoints store them), zeros [G, out] integers, g_idx [in])."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    maxq = (1 << bits) - 1
    g_idx = torch.arange(in_f) // gs
    if order is not None:
        g_idx = torch.empty(in_f, dtype=torch.long)
        g_idx[order] = torch.arange(in_f) // gs
    groups = in_f // gs
    scales = torch.empty(groups, out_f, dtype=torch.float64)
    zeros = torch.empty(groups, out_f, dtype=torch.float64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            s = cols.abs().amax(1) * 2 / maxq
            z = torch.full((out_f,), float(1 << (bits - 1)), dtype=torch.float64)
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            s = (hi - lo) / maxq
            z = torch.round(-lo / s).clamp(min_zero, maxq)
        scales[g] = s.half().double()
        zeros[g] = z
    q = torch.clamp(torch.round(w / scales[g_idx].t()) + zeros[g_idx].t(), 0, maxq).long()
    return q, scales, zeros, g_idx


def dequant(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """[out, in] float64."""
    return (q.double() - zeros[g_idx].t()) * scales[g_idx].t()


def gptq_pack(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """GPTQ's packing, one word at a time: ``32 // bits`` consecutive values along ``axis`` per uint32,
    the first in the lowest bits. Returns int32 (the same bits)."""
    v = np.moveaxis(np.asarray(values, dtype=np.uint32), axis, 0)
    pf = 32 // bits
    out = np.zeros((v.shape[0] // pf,) + v.shape[1:], dtype=np.uint32)
    for row in range(out.shape[0]):
        for j in range(pf):
            out[row] |= (v[row * pf + j] & ((1 << bits) - 1)) << np.uint32(bits * j)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis)).view(np.int32)


def _act_orders(float_dir: Path, seed: int) -> dict[tuple[int, str], torch.Tensor]:
    cfg = json.loads((float_dir / "config.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    sizes = {"attn": cfg["hidden_size"], "o": cfg["hidden_size"], "mlp": cfg["hidden_size"],
             "down": cfg["intermediate_size"]}
    return {(layer, kind): torch.randperm(size, generator=gen)
            for layer in range(cfg["num_hidden_layers"]) for kind, size in sizes.items()}


def write_gptq(float_dir: Path, out_dir: Path, bits: int, group_size: int, desc_act: bool, sym: bool,
               checkpoint_format: str = "gptq", seed: int = 0) -> dict[str, torch.Tensor]:
    """A GPTQ checkpoint of ``float_dir``'s model in ``out_dir``; returns the dequantized weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in float_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out_dir / f.name)
    tensors = load_file(str(float_dir / "model.safetensors"))
    orders = _act_orders(float_dir, seed) if desc_act else {}
    out, deq = {}, {}
    for name, t in tensors.items():
        module = name[: -len(".weight")]
        sub = module.split(".", 3)[-1] if module.startswith("model.layers.") else None
        if sub not in LINEARS:
            out[name] = t
            continue
        layer = int(module.split(".")[2])
        order = orders.get((layer, INPUT_OF[sub]))
        # The v1 format stores zero - 1: a zero of 0 cannot be written (AutoGPTQ's known limit).
        q, scales, zeros, g_idx = quantize_rtn(t.double(), bits, group_size, sym, order,
                                               min_zero=1 if checkpoint_format == "gptq" else 0)
        deq[name] = dequant(q, scales, zeros, g_idx)
        stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
        out[f"{module}.qweight"] = torch.from_numpy(gptq_pack(q.t().numpy(), bits, 0))
        out[f"{module}.qzeros"] = torch.from_numpy(gptq_pack(stored_zeros.long().numpy(), bits, 1))
        out[f"{module}.scales"] = scales.half()
        out[f"{module}.g_idx"] = g_idx.int()
    save_file(out, str(out_dir / "model.safetensors"))
    cfg = json.loads((float_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                  "desc_act": desc_act, "sym": sym, "checkpoint_format": checkpoint_format,
                                  "damp_percent": 0.01, "true_sequential": True}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return deq


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_pack(values: np.ndarray) -> np.ndarray:
    """AutoAWQ's GEMM packing of [rows, N] 4-bit values along N: word j's i-th nibble is column
    ``8j + AWQ_ORDER[i]``. Returns int32 [rows, N // 8]."""
    v = np.asarray(values, dtype=np.uint32)
    out = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
    for j in range(out.shape[1]):
        for i, col in enumerate(AWQ_ORDER):
            out[:, j] |= (v[:, 8 * j + col] & 0xF) << np.uint32(4 * i)
    return out.view(np.int32)


def write_awq(float_dir: Path, out_dir: Path, group_size: int, modules_to_not_convert: Optional[list] = None
              ) -> dict[str, torch.Tensor]:
    """An AutoAWQ GEMM checkpoint (4 bits, zero points) of ``float_dir``'s model; returns the dequantized
    weights (the original ones for ``modules_to_not_convert``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in float_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out_dir / f.name)
    skip = modules_to_not_convert or []
    out, deq = {}, {}
    for name, t in load_file(str(float_dir / "model.safetensors")).items():
        module = name[: -len(".weight")]
        if module.split(".", 3)[-1] not in LINEARS or any(m in module for m in skip):
            out[name] = t
            continue
        q, scales, zeros, g_idx = quantize_rtn(t.double(), 4, group_size, False, None)
        deq[name] = dequant(q, scales, zeros, g_idx)
        out[f"{module}.qweight"] = torch.from_numpy(awq_pack(q.t().numpy()))
        out[f"{module}.qzeros"] = torch.from_numpy(awq_pack(zeros.long().numpy()))
        out[f"{module}.scales"] = scales.half()
    save_file(out, str(out_dir / "model.safetensors"))
    cfg = json.loads((float_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": modules_to_not_convert}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return deq


def write_squeezellm(float_dir: Path, out_dir: Path) -> dict[str, torch.Tensor]:
    """A SqueezeLLM checkpoint: per output channel a table of 16 values (the row's quantiles, as float16),
    each weight the index of its nearest value, packed as GPTQ packs along the inputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in float_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out_dir / f.name)
    out, deq = {}, {}
    for name, t in load_file(str(float_dir / "model.safetensors")).items():
        module = name[: -len(".weight")]
        if module.split(".", 3)[-1] not in LINEARS:
            out[name] = t
            continue
        lut = torch.quantile(t.double(), torch.linspace(0, 1, 16, dtype=torch.float64), dim=1).t().half()  # [out, 16]
        q = (t.double()[:, :, None] - lut.double()[:, None, :]).abs().argmin(-1)  # [out, in]
        deq[name] = torch.gather(lut.double(), 1, q)
        out[f"{module}.qweight"] = torch.from_numpy(gptq_pack(q.t().numpy(), 4, 0))
        out[f"{module}.lookup_table"] = lut
    save_file(out, str(out_dir / "model.safetensors"))
    cfg = json.loads((float_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "squeezellm", "wbits": 4}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return deq


def write_compressed_tensors(float_dir: Path, out_dir: Path, bits: int, group_size: int,
                             symmetric: bool) -> dict[str, torch.Tensor]:
    """A pack-quantized checkpoint written by the compressed-tensors library (min-max scales by its
    ``calculate_qparams``); returns the weights its own decompression gives back."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32)
    strategy = "channel" if group_size == -1 else "group"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=None if group_size == -1 else group_size)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for _, m in model.named_modules():
            if getattr(m, "quantization_scheme", None) is None:
                continue
            w = m.weight.data if group_size == -1 else m.weight.data.unflatten(-1, (-1, group_size))
            lo, hi = (w.amin(-1, keepdim=group_size == -1), w.amax(-1, keepdim=group_size == -1))
            scale, zero = calculate_qparams(lo, hi, args)
            m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
            if getattr(m, "weight_zero_point", None) is not None:
                m.weight_zero_point.data.copy_(zero.reshape(m.weight_zero_point.shape))
    return _compress_and_save(model, "pack-quantized", float_dir, out_dir)


def write_compressed_tensors_actorder(float_dir: Path, out_dir: Path, bits: int, group_size: int, symmetric: bool,
                                     seed: int = 0) -> dict[str, torch.Tensor]:
    """A pack-quantized checkpoint with ``actorder: "group"`` (``weight_g_idx``: the layout of older
    llm-compressor GPTQ runs, which the installed library no longer writes): groups formed in a random
    order of each input's channels (shared by q/k/v and gate/up), packed by the library's
    ``pack_to_int32``. Returns the dequantized weights."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in float_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out_dir / f.name)
    orders = _act_orders(float_dir, seed)
    half = 1 << (bits - 1)
    out, deq = {}, {}
    for name, t in load_file(str(float_dir / "model.safetensors")).items():
        module = name[: -len(".weight")]
        sub = module.split(".", 3)[-1] if module.startswith("model.layers.") else None
        if sub not in LINEARS:
            out[name] = t
            continue
        order = orders[(int(module.split(".")[2]), INPUT_OF[sub])]
        q, scales, zeros, g_idx = quantize_rtn(t.double(), bits, group_size, symmetric, order)
        deq[name] = dequant(q, scales, zeros, g_idx)
        out[f"{module}.weight_packed"] = pack_to_int32((q - half).to(torch.int8), bits)
        out[f"{module}.weight_scale"] = scales.t().float().contiguous()
        if not symmetric:
            out[f"{module}.weight_zero_point"] = pack_to_int32((zeros.t() - half).to(torch.int8), bits, packed_dim=0)
        out[f"{module}.weight_shape"] = torch.tensor(t.shape)
        out[f"{module}.weight_g_idx"] = g_idx.int()
    save_file(out, str(out_dir / "model.safetensors"))
    cfg = json.loads((float_dir / "config.json").read_text())
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size,
               "actorder": "group", "dynamic": False}
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "ignore": ["lm_head"], "quantization_status": "compressed",
                                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return deq


def write_compressed_tensors_fp8(float_dir: Path, out_dir: Path, per_channel: bool, static: bool,
                                input_scale: float = 0.02) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A float-quantized FP8 W8A8 checkpoint written by the compressed-tensors library: weight scales
    amax / 448 (its ``calculate_qparams``) per channel or per tensor; activations per token (dynamic)
    or with ``input_scale`` (static). Returns (the library's dequantized weights, {module: input scale})."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32)
    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True,
                               strategy="channel" if per_channel else "tensor")
    acts = (QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False) if static
            else QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True))
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    in_scales = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if getattr(m, "quantization_scheme", None) is None:
                continue
            w = m.weight.data
            lo, hi = (w.amin(1, keepdim=True), w.amax(1, keepdim=True)) if per_channel else (w.min(), w.max())
            scale, _ = calculate_qparams(lo, hi, weights)
            m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
            if static:
                m.input_scale.data.fill_(input_scale)
                in_scales[name] = input_scale
    return _compress_and_save(model, "float-quantized", float_dir, out_dir), in_scales


def hf_reference(float_dir: Path, weights: dict[str, torch.Tensor]):
    """HF transformers' model of ``float_dir`` (float32) with ``weights`` replacing its linear weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w.float())
    return model


@pytest.fixture(scope="session")
def float_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_float_checkpoint(tmp_path_factory.mktemp("quant-float"))


@pytest.fixture(scope="session")
def gptq_checkpoint(float_checkpoint, tmp_path_factory) -> Callable[..., tuple[Path, dict[str, torch.Tensor]]]:
    """``gptq_checkpoint(bits, group_size, desc_act, sym, fmt)`` -> (dir, dequantized weights), cached."""
    built: dict[tuple, tuple[Path, dict]] = {}

    def make(bits: int, group_size: int, desc_act: bool, sym: bool, fmt: str = "gptq"):
        key = (bits, group_size, desc_act, sym, fmt)
        if key not in built:
            out = tmp_path_factory.mktemp("gptq")
            built[key] = (out, write_gptq(float_checkpoint, out, bits, group_size, desc_act, sym, fmt))
        return built[key]

    return make


@pytest.fixture(scope="session")
def ct_checkpoint(float_checkpoint, tmp_path_factory) -> Callable[..., tuple[Path, dict[str, torch.Tensor]]]:
    """``ct_checkpoint(bits, group_size, symmetric)`` -> (dir, the library's dequantized weights), cached."""
    built: dict[tuple, tuple[Path, dict]] = {}

    def make(bits: int, group_size: int, symmetric: bool):
        key = (bits, group_size, symmetric)
        if key not in built:
            pytest.importorskip("compressed_tensors")
            out = tmp_path_factory.mktemp("ct")
            built[key] = (out, write_compressed_tensors(float_checkpoint, out, bits, group_size, symmetric))
        return built[key]

    return make


def _compress_and_save(model: Any, fmt: str, float_dir: Path, out_dir: Path) -> dict[str, torch.Tensor]:
    """Writes ``model`` (its quantization scheme attached and calibrated) to ``out_dir`` compressed by
    the compressed-tensors library in ``fmt``, with ``float_dir``'s tokenizer files; returns the
    library's own decompression of the decoder linears' weights (float64): the reference."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    model.save_pretrained(str(out_dir))
    compressor.update_config(str(out_dir))
    for f in float_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out_dir / f.name)
    compressor.decompress_model(model)
    return {f"{name}.weight": m.weight.data.double().clone() for name, m in model.named_modules()
            if name.split(".", 3)[-1] in LINEARS}
