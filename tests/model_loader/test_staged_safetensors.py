"""The chunked safetensors reader (model_loader/staged_safetensors.py) on the CPU, unpinned: every
tensor byte-exact against safetensors' own ``load_file``, whatever the chunk size (tensors packed
into one chunk, split over many, chunks across file boundaries), and a tp=2 rank's parameters
equal to those loaded through ``safe_open``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.config import EngineArgs
from vllm_engine.distributed import override_parallel_state
from vllm_engine.model_loader import build_model, load_checkpoint
from vllm_engine.model_loader import staged_safetensors
from vllm_engine.model_loader.staged_safetensors import SafetensorsStager, plan_chunks, read_header
from vllm_engine.model_loader.weights import iter_safetensors, iter_safetensors_per_tensor

CPU = torch.device("cpu")


def mixed_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Every dtype a checkpoint carries, sizes from a scalar to a few KiB, and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "big.bf16": torch.randn(37, 41, generator=g).to(torch.bfloat16),  # 3034 bytes
        "w.f32": torch.randn(13, 7, generator=g),
        "qweight.i32": torch.randint(-2**31, 2**31 - 1, (5, 9), generator=g, dtype=torch.int32),
        "norm.f16": torch.randn(11, generator=g).to(torch.float16),
        "weight.f8": torch.randn(6, 5, generator=g).clamp(-400, 400).to(torch.float8_e4m3fn),
        "k_scale": torch.tensor(0.75),
        "mask.bool": torch.rand(7, generator=g) > 0.5,
        "empty.f32": torch.empty(0, 4),
        "ids.i64": torch.arange(3, dtype=torch.int64),
    }


def write_shards(d: Path, shards: list[dict[str, torch.Tensor]]) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, tensors in enumerate(shards):
        path = d / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (NaN-safe, float8 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 4096, 1 << 20])
def test_plan_covers_every_byte_once_within_the_chunk_size(tmp_path, chunk_bytes):
    (path,) = write_shards(tmp_path, [mixed_tensors(0)])
    entries = read_header(path)
    chunks = plan_chunks(entries, chunk_bytes)
    covered = {i: [] for i in range(len(entries))}
    for c in chunks:
        assert c.end - c.start <= chunk_bytes
        for p in c.pieces:
            assert 0 <= p.src and p.src + p.nbytes <= c.end - c.start
            assert c.start + p.src == entries[p.entry].start + p.dst  # the right file bytes
            covered[p.entry].append((p.dst, p.dst + p.nbytes))
    completed = [i for c in chunks for i in c.completes]
    assert sorted(completed) == list(range(len(entries)))  # each tensor completed exactly once
    for i, spans in covered.items():
        spans.sort()
        pos = 0
        for a, b in spans:
            assert a == pos
            pos = b
        assert pos == entries[i].nbytes
    if chunk_bytes >= 1 << 20:
        assert len(chunks) == 1  # small tensors share one read


@pytest.mark.parametrize("read", ["mmap", "pread"])
@pytest.mark.parametrize("chunk_bytes,num_buffers", [(64, 2), (1000, 3), (4096, 1), (256 << 20, 2)])
def test_stager_is_byte_exact_across_files_and_chunks(tmp_path, monkeypatch, chunk_bytes, num_buffers, read):
    """64 and 1000 bytes: the 3034-byte bf16 tensor spans several chunks; 4096: chunks pack several
    tensors; 256 MiB: one chunk per file. pread: each chunk split over 3 threads in 16-byte parts."""
    monkeypatch.setattr(staged_safetensors, "READ_ALIGN", 16)
    shards = [mixed_tensors(1), {k + ".b": v for k, v in mixed_tensors(2).items()}, {"tail.f32": torch.ones(3)}]
    paths = write_shards(tmp_path, shards)
    stager = SafetensorsStager(CPU, chunk_bytes=chunk_bytes, num_buffers=num_buffers, pin_memory=False, read=read,
                               read_threads=3)
    got = dict(stager.iter_files(paths))
    want = {k: v for p in paths for k, v in load_file(str(p)).items()}
    assert set(got) == set(want)
    for name, t in want.items():
        assert same_bytes(got[name], t), name


def test_stager_reuses_its_buffers_and_tensors_outlive_them(tmp_path):
    """Yielded tensors are their own memory, not views of a buffer the next chunk overwrites."""
    paths = write_shards(tmp_path, [mixed_tensors(3)])
    stager = SafetensorsStager(CPU, chunk_bytes=128, num_buffers=2, pin_memory=False)
    got = list(stager.iter_files(paths))
    assert stager.num_chunks > len(stager.buffers)
    buffers = {b.data_ptr() for b in stager.buffers}
    assert not any(t.untyped_storage().data_ptr() in buffers for _, t in got if t.numel())
    want = load_file(str(paths[0]))
    assert all(same_bytes(t, want[n]) for n, t in got)


def test_corrupt_header_and_truncated_file_are_refused(tmp_path):
    (path,) = write_shards(tmp_path, [mixed_tensors(4)])
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="Truncated safetensors file"):
        read_header(path)
    (n,) = torch.tensor(list(data[:8]), dtype=torch.uint8).view(torch.int64).tolist()
    header = json.loads(data[8: 8 + n])
    header["w.f32"]["shape"] = [13, 8]  # the bytes no longer match the shape
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(ValueError, match="w.f32"):
        read_header(path)


def model_config(path: Path, device: str = "cpu"):
    return EngineArgs(model=str(path), dtype="float32", device=device, max_model_len=128).create_engine_config().model


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA: pinned buffers and a side stream"))])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tp2_ranks_load_the_same_slices_as_safe_open(tiny_model_dir, tmp_path, arch, device):
    """Each rank of tp=2 built and filled once through safe_open and once through the stager (tiny
    chunks, two shards) reading only the rows the rank's loaders take (``checkpoint_row_ranges``):
    every parameter equal, and the fused q|k|v rows are the rank's slice of the checkpoint's. (One
    process plays both ranks, on the CPU or one GPU.)"""
    dev = torch.device(device)
    src = tiny_model_dir(arch)
    tensors = load_file(str(src / "model.safetensors"))
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    write_shards(d, [{n: tensors[n] for n in names[::2]}, {n: tensors[n] for n in names[1::2]}])
    cfg = model_config(d, device)
    total = sum(t.nbytes for t in tensors.values())
    for rank in range(2):
        with override_parallel_state(tp_rank=rank, tp_size=2):
            ref, _ = build_model(cfg, dev, TorchAttentionBackend())
            load_checkpoint(ref, iter_safetensors_per_tensor(d, dev, torch.float32), str(d))
            staged, _ = build_model(cfg, dev, TorchAttentionBackend())
            with torch.no_grad():
                for p in staged.parameters():
                    p.fill_(float("nan"))  # whatever the loader leaves unwritten differs from the reference
            rows = staged.checkpoint_row_ranges()
            stager = SafetensorsStager(dev, chunk_bytes=700, num_buffers=2)
            load_checkpoint(staged, stager.iter_files(sorted(d.glob("*.safetensors")), rows), str(d))
        want = dict(ref.named_parameters())
        for name, p in staged.named_parameters():
            assert torch.equal(p, want[name]), (rank, name)
        attn = staged.model.layers[0].self_attn
        q = tensors["model.layers.0.self_attn.q_proj.weight"].float().to(dev)
        n = attn.qkv_proj.num_heads * attn.qkv_proj.head_size
        assert 0 < n < q.shape[0]  # a real slice
        assert torch.equal(attn.qkv_proj.weight[:n], q[rank * n: (rank + 1) * n])
        assert rows["model.layers.0.self_attn.q_proj.weight"] == (rank * n, (rank + 1) * n)
        for part in ("self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert f"model.layers.1.{part}.weight" in rows
        assert "model.embed_tokens.weight" in rows and "lm_head.weight" in rows
        assert not any(k.endswith(("o_proj.weight", "down_proj.weight", "norm.weight")) for k in rows)
        assert stager.bytes_read < 0.8 * total  # the column-parallel halves and half the vocabulary


def test_stager_reads_only_the_rows_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(staged_safetensors, "MAX_GAP", 0)  # never read through a gap
    paths = write_shards(tmp_path, [mixed_tensors(10)])
    want = load_file(str(paths[0]))
    rows = {"big.bf16": (5, 17), "w.f32": (13, 13), "qweight.i32": (0, 99), "norm.f16": (2, 3)}
    stager = SafetensorsStager(CPU, chunk_bytes=256, num_buffers=2, pin_memory=False)
    got = dict(stager.iter_files(paths, rows))
    assert set(got) == set(want)
    assert torch.equal(got["big.bf16"][5:17], want["big.bf16"][5:17])
    assert torch.equal(got["norm.f16"][2:3], want["norm.f16"][2:3])
    assert same_bytes(got["qweight.i32"], want["qweight.i32"])  # not a range of its rows: read whole
    assert got["w.f32"].shape == (13, 7)  # no rows: nothing read, the shape kept
    skipped = (37 - 12) * 41 * 2 + 13 * 7 * 4 + 10 * 2
    assert stager.bytes_read == sum(t.nbytes for t in want.values()) - skipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned buffers, a side stream and events need CUDA")
@pytest.mark.parametrize("read", ["mmap", "pread"])
@pytest.mark.parametrize("chunk_bytes,num_buffers", [(1000, 2), (4096, 3), (256 << 20, 3)])
def test_cuda_stager_is_byte_exact_with_pinned_buffers(tmp_path, monkeypatch, chunk_bytes, num_buffers, read):
    """On the GPU: every tensor equal to load_file's, whether the consumer drops each tensor at once
    (its memory reused by the next chunk's tensors while copies may be in flight) or keeps them all;
    a big tensor over many chunks."""
    monkeypatch.setattr(staged_safetensors, "READ_ALIGN", 64)
    g = torch.Generator().manual_seed(7)
    shards = [mixed_tensors(8), {"huge.bf16": torch.randn(300, 257, generator=g).to(torch.bfloat16)},
              {k + ".c": v for k, v in mixed_tensors(9).items()}]
    paths = write_shards(tmp_path, shards)
    want = {k: v for p in paths for k, v in load_file(str(p)).items()}
    for keep in (False, True):
        stager = SafetensorsStager("cuda", chunk_bytes=chunk_bytes, num_buffers=num_buffers, read=read,
                                   read_threads=3)
        assert all(b.is_pinned() for b in stager.buffers)
        kept, seen = {}, set()
        for name, t in stager.iter_files(paths):
            assert t.is_cuda
            if keep:
                kept[name] = t
            else:
                assert same_bytes(t.cpu(), want[name]), name
            seen.add(name)
        assert seen == set(want)
        for name, t in kept.items():
            assert same_bytes(t.cpu(), want[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the staged path is the CUDA path")
def test_cuda_get_model_loads_the_same_parameters_as_safe_open(tiny_model_dir):
    src = tiny_model_dir("qwen3")
    cfg = EngineArgs(model=str(src), dtype="bfloat16", device="cuda", max_model_len=128).create_engine_config().model
    dev = torch.device("cuda")
    ref, _ = build_model(cfg, dev, TorchAttentionBackend())
    load_checkpoint(ref, iter_safetensors_per_tensor(src, dev, torch.bfloat16), str(src))
    staged, _ = build_model(cfg, dev, TorchAttentionBackend())
    with torch.no_grad():
        for p in staged.parameters():
            p.fill_(float("nan"))
    load_checkpoint(staged, iter_safetensors(src, dev, torch.bfloat16), str(src))  # the package's CUDA path
    want = dict(ref.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in staged.named_parameters())


QUANTIZED = {
    "gptq-4bit-g32": lambda q, f, o: q.write_gptq(f, o, 4, 32, False, True),
    "gptq-act-order": lambda q, f, o: q.write_gptq(f, o, 4, 32, True, True),
    "awq": lambda q, f, o: q.write_awq(f, o, 32),
    "compressed-tensors-w4a16": lambda q, f, o: q.write_compressed_tensors(f, o, 4, 32, True),
    "compressed-tensors-w4a16-asym": lambda q, f, o: q.write_compressed_tensors(f, o, 4, 32, False),  # packed rows
    "compressed-tensors-fp8": lambda q, f, o: q.write_compressed_tensors_fp8(f, o, True, True),
}


@pytest.mark.parametrize("fmt", list(QUANTIZED))
def test_tp2_quantized_ranks_read_only_their_rows(tmp_path, fmt):
    """Quantized layers (packed words, group scales, act order, static scales): at tp=2 the stager
    reading only ``checkpoint_row_ranges`` fills every parameter as safe_open's whole tensors do."""
    q = pytest.importorskip("tests.quantization.conftest")
    if "compressed" in fmt:
        pytest.importorskip("compressed_tensors")
    float_dir = q.build_float_checkpoint(tmp_path / "float")
    out = tmp_path / fmt
    QUANTIZED[fmt](q, float_dir, out)
    cfg = model_config(out)
    files = sorted(out.glob("*.safetensors"))
    for rank in range(2):
        with override_parallel_state(tp_rank=rank, tp_size=2):
            ref, _ = build_model(cfg, CPU, TorchAttentionBackend())
            staged, _ = build_model(cfg, CPU, TorchAttentionBackend())
            with torch.no_grad():  # the same sentinel in both: a parameter no loader fills stays equal
                for p in [*ref.parameters(), *staged.parameters()]:
                    p.fill_(float("nan") if p.is_floating_point() else -7)
            load_checkpoint(ref, iter_safetensors_per_tensor(out, CPU, torch.float32), str(out))
            rows = staged.checkpoint_row_ranges()
            stager = SafetensorsStager(CPU, chunk_bytes=4096, num_buffers=2, pin_memory=False)
            load_checkpoint(staged, stager.iter_files(files, rows), str(out))
        assert rows
        want = dict(ref.named_parameters())
        for name, p in staged.named_parameters():
            assert same_bytes(p.data, want[name].data), (fmt, rank, name)
