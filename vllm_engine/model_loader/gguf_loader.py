"""GGUF files: metadata -> HF config, and tensors -> HF-named torch tensors (dequantized by us, in torch).

Block formats (little endian; ``d``/``m`` are float16 unless noted), as llama.cpp's ggml-quants:

* Q4_0  (32 values, 18 B):  d, 16 B nibbles           x = (q - 8) * d
* Q4_1  (32 values, 20 B):  d, m, 16 B nibbles        x = q * d + m
* Q8_0  (32 values, 34 B):  d, 32 x int8              x = q * d
  (4-bit blocks: byte j holds value j in its low nibble and value j + 16 in its high nibble)
* Q4_K / Q5_K / Q6_K / Q8_K (256 values): super-blocks with 6-bit / int8 sub-block scales.

llama.cpp's converter permutes the rows of Llama's q/k projections (interleaved rotary pairs);
we undo it so the weights match HF's rotate-half layout.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from vllm_engine.model_loader.gguf_archs import CONFIG_TENSORS, GGUF_ARCHS, gguf_arch, unpermute_qk  # noqa: F401

# ---- dequantization ------------------------------------------------------------------------------
QK_K = 256


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] float32 (little-endian float16)."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] uint8 -> [n, 32]: low nibbles are values 0..15, high nibbles 16..31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()


def dequant_q4_0(b: torch.Tensor) -> torch.Tensor:
    """b: [n_blocks, 18] uint8 -> [n_blocks, 32] float32."""
    return (_nibbles(b[:, 2:]) - 8.0) * _f16(b[:, :2])[:, None]


def dequant_q4_1(b: torch.Tensor) -> torch.Tensor:
    """b: [n_blocks, 20] uint8 -> [n_blocks, 32] float32."""
    return _nibbles(b[:, 4:]) * _f16(b[:, :2])[:, None] + _f16(b[:, 2:4])[:, None]


def dequant_q8_0(b: torch.Tensor) -> torch.Tensor:
    """b: [n_blocks, 34] uint8 -> [n_blocks, 32] float32."""
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])[:, None]


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed scale bytes of Q4_K/Q5_K -> (scales [n, 8], mins [n, 8]) as 6-bit integers."""
    s = s.long()
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63  # sub-blocks 0..3
    hi_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)  # sub-blocks 4..7
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat((lo_sc, hi_sc), 1).float(), torch.cat((lo_m, hi_m), 1).float()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] uint8 -> [n, 8, 32]: chunk i of 32 bytes gives sub-block 2i (low) and 2i + 1 (high)."""
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat((q & 0x0F, q >> 4), dim=2).reshape(-1, 8, 32)


def dequant_q4_k(b: torch.Tensor) -> torch.Tensor:
    """b: [n, 144] uint8 (d, dmin, scales[12], qs[128]) -> [n, 256] float32."""
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, m = _k_scales_mins(b[:, 4:16])
    q = _k_nibbles(b[:, 16:144]).float()
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(-1, QK_K)


def dequant_q5_k(b: torch.Tensor) -> torch.Tensor:
    """b: [n, 176] uint8 (d, dmin, scales[12], qh[32], qs[128]) -> [n, 256] float32."""
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, m = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]  # bit j of qh[l] is the 5th bit of value l of sub-block j
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)[None, :, None]
    high = ((qh[:, None, :] >> shifts) & 1) << 4
    q = (_k_nibbles(b[:, 48:176]) | high).float()
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(-1, QK_K)


def dequant_q6_k(b: torch.Tensor) -> torch.Tensor:
    """b: [n, 210] uint8 (ql[128], qh[64], scales[16] int8, d) -> [n, 256] float32."""
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # [half, first/second 32 bytes, l]
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float().reshape(n, 2, 8)
    d = _f16(b[:, 208:210])[:, None, None]
    # Within each half of 128 values: rows 0..3 of 32 are (ql lo, ql[32:] lo, ql hi, ql[32:] hi),
    # their 2 high bits at qh bits 0-1, 2-3, 4-5, 6-7.
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2)  # [n, 2, 4, 32]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)[None, None, :, None]
    high = ((qh >> shifts) & 3) << 4
    q = (low | high).float() - 32.0  # [n, 2, 4, 32]
    scales = sc.reshape(n, 2, 4, 2, 1).expand(n, 2, 4, 2, 16).reshape(n, 2, 4, 32)
    return (d[..., None] * scales * q).reshape(n, QK_K)


def dequant_q8_k(b: torch.Tensor) -> torch.Tensor:
    """b: [n, 292] uint8 (d float32, qs[256] int8, bsums[16] int16) -> [n, 256] float32."""
    d = b[:, 0:4].contiguous().view(torch.float32)
    return b[:, 4:260].contiguous().view(torch.int8).float() * d


# type name -> (values per block, bytes per block, dequantizer)
DEQUANTIZERS = {
    "Q4_0": (32, 18, dequant_q4_0),
    "Q4_1": (32, 20, dequant_q4_1),
    "Q8_0": (32, 34, dequant_q8_0),
    "Q4_K": (256, 144, dequant_q4_k),
    "Q5_K": (256, 176, dequant_q5_k),
    "Q6_K": (256, 210, dequant_q6_k),
    "Q8_K": (256, 292, dequant_q8_k),
}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SUPPORTED_TYPES = sorted(list(DEQUANTIZERS) + list(_PLAIN))


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...], device: torch.device = torch.device("cpu"),
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw GGUF tensor bytes (``GGUFReader`` tensor ``.data``) -> a ``shape`` tensor (row-major, torch order:
    the reverse of GGML's ne order) of ``dtype`` on ``device``. The bytes move to the device first, so the
    dequantization runs there."""
    # A copy: the memory map is read-only, and torch wants writable memory.
    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True).reshape(-1)).to(device)
    if type_name in _PLAIN:
        return raw.view(_PLAIN[type_name]).reshape(shape).to(dtype)
    if type_name not in DEQUANTIZERS:
        raise ValueError(f"Unsupported GGUF tensor type {type_name}; supported: {', '.join(SUPPORTED_TYPES)}.")
    block_values, block_bytes, fn = DEQUANTIZERS[type_name]
    return fn(raw.view(-1, block_bytes)).reshape(shape).to(dtype)


# ---- reading the file ----------------------------------------------------------------------------
# Our own header parser: gguf.GGUFReader builds a Python object per token string (5 s for a 49k
# vocabulary); walking the header ourselves takes ~0.1 s and the tensor bytes are memory-mapped.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    type_name: str  # "Q4_1", "F32", ...
    shape: tuple[int, ...]  # torch order (GGML's ne reversed)
    data: np.ndarray  # raw bytes, uint8, memory-mapped


@dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ValueError("unexpected end of file in the header")
        out = self.buf[self.pos: self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _NP:
                return np.frombuffer(self.take(count * np.dtype(_NP[etype]).itemsize), dtype=_NP[etype]).tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Metadata and memory-mapped tensors of a GGUF file; ValueError if it is not a readable GGUF
    (bad magic, unsupported version, truncated header or tensor data)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = str(path)
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read GGUF file {path}: {e}") from None
    cur = _Cursor(memoryview(mm))
    try:
        if bytes(cur.take(4)) != b"GGUF":
            raise ValueError("bad magic (not a GGUF file)")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"Corrupt or truncated GGUF file {path}: {e}") from None
    align = int(meta.get("general.alignment", 32))
    data_start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"GGUF tensor {name} has unknown type id {type_id}.") from None
        block_values, block_bytes = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims)) if dims else 1
        n_bytes = n_elements // block_values * block_bytes
        start = data_start + offset
        if start + n_bytes > len(mm):
            raise ValueError(f"Truncated GGUF file {path}: tensor {name} ends past the end of the file.")
        tensors.append(GGUFTensor(name, qtype.name, tuple(int(d) for d in reversed(dims)), mm[start: start + n_bytes]))
    return GGUFFile(path, meta, tensors)


def gguf_metadata(reader: GGUFFile) -> dict[str, Any]:
    """Every key/value field (token lists included) as plain Python values."""
    return dict(reader.metadata)


def gguf_to_hf_config(meta: dict[str, Any], has_output: bool, tensors: Optional[dict[str, GGUFTensor]] = None) -> Any:
    """A transformers config from GGUF metadata (and, for Phi-3's LongRoPE, its rope factor tensors:
    ``tensors`` by name); ValueError on an architecture or a field we cannot map (model_loader/gguf_archs.py)."""
    from transformers import AutoConfig

    spec = gguf_arch(meta)
    arch = meta["general.architecture"]

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}.")
        return value

    kwargs = _common_config(meta, arch, get, has_output)
    kwargs["architectures"] = [spec.architecture]
    if spec.config is not None:
        kwargs = spec.config(get, kwargs, tensors or {})
    return AutoConfig.for_model(kwargs.pop("model_type", spec.model_type), **kwargs)


def _common_config(meta: dict[str, Any], arch: str, get: Any, has_output: bool) -> dict[str, Any]:
    """The fields every architecture's metadata gives, under Llama's config names."""
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    if vocab is None:
        raise ValueError(f"GGUF metadata lacks {arch}.vocab_size and a token list.")
    head_dim = get("attention.key_length", None, required=False) or get("rope.dimension_count", None, False)
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden,
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        intermediate_size=int(get("feed_forward_length")),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        vocab_size=int(vocab),
        tie_word_embeddings=not has_output,
        head_dim=int(head_dim) if head_dim else hidden // heads,
    )
    for name in ("bos", "eos", "padding"):
        tok = meta.get(f"tokenizer.ggml.{name}_token_id")
        if tok is not None:
            kwargs["pad_token_id" if name == "padding" else f"{name}_token_id"] = int(tok)
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    window = meta.get(f"{arch}.attention.sliding_window")
    if window:
        kwargs["sliding_window"] = int(window)
    return kwargs


def hf_name(gguf_name: str, arch: str = "llama") -> Optional[str]:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (names of ``arch``, a GGUF
    ``general.architecture``); None for unknown names."""
    return GGUF_ARCHS[arch].hf_name(gguf_name)


def iter_gguf_weights(path: str | os.PathLike, hf_config: Any, device: torch.device, dtype: torch.dtype,
                      keep_quantized: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, dequantized tensor in ``dtype`` on ``device``) for every tensor of the file,
    with llama.cpp's changes undone (gguf_archs.py: q/k permutation, stacked experts, Gemma's 1 + w
    norms, ...); the tensors named in ``keep_quantized`` (Llama-family files) come as their raw
    bytes instead, [rows, bytes per row] uint8 with ``gguf_type`` and ``gguf_shape`` attributes
    (quantization/gguf.py decodes them)."""
    reader = open_gguf(path)
    spec = gguf_arch(reader.metadata)
    pending: dict = {}  # tensors that come in parts (gguf_archs.convert_deepseek)
    for t in reader.tensors:
        name = spec.hf_name(t.name)
        if name is None:
            if t.name.startswith(CONFIG_TENSORS):  # rope factors: read into the config, or computed from it
                continue
            raise ValueError(f"GGUF tensor {t.name!r} has no counterpart in the model.")
        if name in keep_quantized:
            w = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True)).to(device).reshape(t.shape[0], -1)
            if spec.convert is not None:  # q/k rows permuted whole: the blocks run along them
                (name, w), = spec.convert(name, w, hf_config, pending)
            w.gguf_type, w.gguf_shape = t.type_name, t.shape
            yield name, w
            continue
        w = dequantize(t.data, t.type_name, t.shape, device, torch.float32)
        for hf, tensor in (spec.convert(name, w, hf_config, pending) if spec.convert is not None else [(name, w)]):
            yield hf, tensor.to(dtype)
    if pending:
        raise ValueError(f"GGUF file {path} lacks the other halves of {sorted(pending)}.")
