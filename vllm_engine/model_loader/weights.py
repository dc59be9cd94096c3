"""Safetensors checkpoints (single file or sharded with an index) and dummy (random) weights."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint's .safetensors files: those named by the sharded index if there is one, else all
    of them in the directory (sorted). ValueError when there are none or the index names a missing shard."""
    d = Path(model_dir)
    index = d / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"Corrupt safetensors index {index}: {e}") from None
        files = [d / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"Safetensors index {index} names missing shard(s): {', '.join(missing)}.")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"No *.safetensors files in {d}.")
    return files


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int, int]:
    """(the header's tensor entries, without ``__metadata__``; the offset where the data starts; the
    file's size). ValueError naming the file when the header is truncated or not a JSON object."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError) as e:
        raise ValueError(f"Corrupt safetensors file {path}: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + n, size


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Cheap integrity check (header only): ValueError if the file is truncated or its header corrupt."""
    header, data_start, size = read_safetensors_header(path)
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"Corrupt safetensors file {path}: {e}") from None
    if data_start + end > size:
        raise ValueError(f"Truncated safetensors file {path}: {size} bytes, its header needs {data_start + end}.")


def _safe_open_device(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def _keeps_dtype(name: str, t: torch.Tensor) -> bool:
    return t.element_size() == 1 or name.endswith(("_scale", "_scale_inv"))


def iter_safetensors(model_dir: str | os.PathLike, device: torch.device, dtype: Optional[torch.dtype] = None,
                     rows: Optional[Mapping[str, tuple[int, int]]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, tensor) lazily, on ``device`` and cast to ``dtype`` (floating tensors only),
    so a checkpoint never sits whole in host memory. Quantized checkpoints'
    float8 weights and their scales (``..._scale``, ``..._scale_inv``) keep their own dtype: the
    quant method holds them at the checkpoint's precision.

    On CUDA through pinned chunks overlapped with the reads (``iter_safetensors_staged``; ``rows``:
    {name: (start, stop)}, the only rows of dim 0 this rank's loaders read, the rest of those tensors
    left unread); elsewhere one tensor at a time (``iter_safetensors_per_tensor``), whole."""
    if torch.device(device).type == "cuda":
        return iter_safetensors_staged(model_dir, device, dtype, rows=rows)
    return iter_safetensors_per_tensor(model_dir, device, dtype)


def _cast(name: str, t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype != dtype and not _keeps_dtype(name, t):
        return t.to(dtype)
    return t


def iter_safetensors_per_tensor(model_dir: str | os.PathLike, device: torch.device,
                                dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``iter_safetensors`` by safetensors' own ``safe_open``, each tensor read and moved on its own."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        check_safetensors_file(path)
        try:
            with safe_open(str(path), framework="pt", device=_safe_open_device(device)) as f:
                for name in f.keys():
                    yield name, _cast(name, f.get_tensor(name), dtype)
        except ValueError:
            raise
        except Exception as e:  # safetensors' own errors on a corrupt file
            raise ValueError(f"Cannot read safetensors file {path}: {e}") from e


def iter_safetensors_staged(model_dir: str | os.PathLike, device: torch.device, dtype: Optional[torch.dtype] = None,
                            chunk_bytes: int = 256 << 20, num_buffers: int = 3, pin_memory: Optional[bool] = None,
                            read: str = "mmap", read_threads: Optional[int] = None,
                            rows: Optional[Mapping[str, tuple[int, int]]] = None,
                            ) -> Iterator[tuple[str, torch.Tensor]]:
    """``iter_safetensors`` through ``SafetensorsStager``: files read (memory-mapped, or ``read=
    "pread"``) in chunks of ``chunk_bytes`` into ``num_buffers`` reused host buffers (pinned on
    CUDA), copied to the device while the next chunk is read; each tensor cast on the device.
    ``rows``: see ``SafetensorsStager.iter_files``."""
    from vllm_engine.model_loader.staged_safetensors import SafetensorsStager

    files = safetensors_files(model_dir)
    for path in files:  # every file checked before the first byte moves
        check_safetensors_file(path)
    stager = SafetensorsStager(device, chunk_bytes=chunk_bytes, num_buffers=num_buffers, pin_memory=pin_memory,
                               read=read, read_threads=read_threads)
    for name, t in stager.iter_files(files, rows):
        yield name, _cast(name, t, dtype)


def is_norm_param(name: str) -> bool:
    """Norm gains start at 1 (not random) so dummy activations keep their scale."""
    return name.endswith("norm.weight")


def _dummy_seed(seed: int, name: str, shard_id: object) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}#{shard_id}".encode())) % (1 << 63)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random normal(0, std) weights (norm gains 1), drawn in place on the parameters' own device and
    dtype (no host round trip: fast for an 8B model on a GPU), reproducible for a given seed and device.

    Each checkpoint tensor a parameter is loaded from (``layers.utils.checkpoint_shapes``: a fused
    q | k | v has three) is drawn whole from a generator seeded by (seed, parameter name, shard), and
    the parameter's ``weight_loader`` keeps this rank's slice: every tensor-parallel rank and pipeline
    stage holds its part of the same weights as a single GPU would (the same device type)."""
    from vllm_engine.layers.utils import checkpoint_shapes, default_weight_loader

    gen: Optional[torch.Generator] = None
    for name, p in model.named_parameters():
        if is_norm_param(name):
            p.fill_(1.0)
            continue
        if not p.is_floating_point():
            p.zero_()
            continue
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device)
        loader = getattr(p, "weight_loader", default_weight_loader)
        name = getattr(p, "checkpoint_name", name)  # a tied LM head on another stage: the embedding's weights
        for shard_id, shape in checkpoint_shapes(p).items():
            gen.manual_seed(_dummy_seed(seed, name, shard_id))
            if shard_id is None and tuple(shape) == tuple(p.shape):
                p.normal_(0.0, std, generator=gen)  # the whole tensor: drawn in place
                continue
            full = torch.empty(shape, dtype=p.dtype, device=p.device).normal_(0.0, std, generator=gen)
            if shard_id is None:
                loader(p, full)
            else:
                loader(p, full, shard_id)
