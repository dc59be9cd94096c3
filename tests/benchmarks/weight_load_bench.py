"""Safetensors weight loading from a warm page cache: GB/s of the per-tensor path (safetensors'
``safe_open`` on the device, what the package did before) against the staged path (memory-mapped,
chunks through pinned buffers, copies overlapped with the next read), into the engine's model.

It writes a checkpoint of the model's real shape with random values (Llama-3.1-8B: 16 GB in ~5 GB
shards; reused when the directory already holds the same one), reads every file once so the page
cache holds it, then loads it ``--reps`` times per variant, variants interleaved, each into the same
model with its parameters zeroed first and compared with the per-tensor path's result.

    PYTHONPATH=. python tests/benchmarks/weight_load_bench.py --model llama-3.1-8b \\
        --dir /tmp/wl-llama8b --out results/weight_load.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from vllm_engine.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from vllm_engine.config import EngineArgs  # noqa: E402
from vllm_engine.model_loader import build_model, load_checkpoint  # noqa: E402
from vllm_engine.model_loader.resolve import CONFIG_DIR  # noqa: E402
from vllm_engine.model_loader.weights import (  # noqa: E402
    SAFETENSORS_INDEX,
    iter_safetensors_per_tensor,
    iter_safetensors_staged,
    safetensors_files,
)

MARKER = "weight_load_bench.json"


def hf_config_dict(model: str, overrides: dict) -> dict:
    """A bundled config name (``llama-3.1-8b``) or a config.json path, with ``overrides`` applied."""
    path = Path(model)
    if not path.is_file():
        path = CONFIG_DIR / f"{model}.json"
    return {**json.loads(path.read_text()), **overrides}


def checkpoint_tensors(config_dir: Path, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor an HF checkpoint of this config holds, from transformers'
    own model built on the meta device (no memory); a tied LM head is not stored."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(config_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    tied = getattr(cfg, "tie_word_embeddings", False)
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")]


def write_checkpoint(d: Path, config: dict, shard_bytes: int, dtype: torch.dtype, seed: int,
                     device: torch.device) -> tuple[int, bool]:
    """Writes config.json, shards of at most ``shard_bytes`` (random normal(0, 0.02) values, drawn on
    ``device``: a GPU draws 16 GB in moments, a CPU core takes minutes) and the index into ``d``,
    unless the same checkpoint is there already. Returns (total bytes, reused)."""
    from safetensors.torch import save_file

    want = {"config": config, "shard_bytes": shard_bytes, "dtype": str(dtype), "seed": seed}
    marker = d / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == want:
        return json.loads(marker.read_text())["total_bytes"], True
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.safetensors"):
        old.unlink()
    (d / "config.json").write_text(json.dumps(config, indent=2))
    tensors = checkpoint_tensors(d, dtype)
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    g = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {n: torch.empty(s, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=g).to(dtype).cpu()
                for n, s in shard}
        save_file(data, str(d / fname), metadata={"format": "pt"})
        total += sum(t.nbytes for t in data.values())
        weight_map.update({n: fname for n, _ in shard})
        del data
    (d / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    marker.write_text(json.dumps({"spec": want, "total_bytes": total}))
    return total, False


def warm_page_cache(files: list[Path]) -> float:
    """Reads every file once (so the page cache holds it); returns that read's GB/s."""
    buf = bytearray(64 << 20)
    t0, n = time.perf_counter(), 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return n / (time.perf_counter() - t0) / 1e9


def pinned_h2d_gbs(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """One pinned host -> device copy of ``nbytes`` (the PCIe ceiling of the staged path)."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return nbytes / (time.perf_counter() - t0) / 1e9


def variants(d: Path, device: torch.device, dtype: torch.dtype,
             staged: list[tuple[float, int, str]]) -> dict[str, Callable[[], Iterator]]:
    """The A/B: the per-tensor path, then the staged path at each (chunk MiB, buffers, read)."""
    out: dict[str, Callable[[], Iterator]] = {"per_tensor": lambda: iter_safetensors_per_tensor(d, device, dtype)}
    for mib, nbuf, read in staged:
        out[f"staged_{mib:g}MiBx{nbuf}_{read}"] = (lambda m=mib, b=nbuf, r=read: iter_safetensors_staged(
            d, device, dtype, chunk_bytes=int(m * (1 << 20)), num_buffers=b, read=r))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_load(model: torch.nn.Module, weights: Iterator, source: str, device: torch.device) -> float:
    """Seconds to fill every parameter (zeroed first, outside the timing) from ``weights``."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    sync(device)
    t0 = time.perf_counter()
    load_checkpoint(model, weights, source)
    sync(device)
    return time.perf_counter() - t0


def same_params(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, reference[n]) for n, p in model.named_parameters())


def parse_staged(text: str) -> list[tuple[float, int, str]]:
    """``"256x3,64x4:pread"`` -> [(256.0, 3, "mmap"), (64.0, 4, "pread")]: chunk MiB x number of
    buffers, and how the files are read (memory-mapped unless ``:pread``)."""
    out = []
    for item in filter(None, text.split(",")):
        size, _, read = item.partition(":")
        mib, nbuf = size.split("x")
        out.append((float(mib), int(nbuf), read or "mmap"))
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    d = Path(args.dir)
    config = hf_config_dict(args.model, json.loads(args.hf_overrides))
    t0 = time.perf_counter()
    total, reused = write_checkpoint(d, config, int(args.shard_gb * (1 << 30)), dtype, args.seed, device)
    write_s = time.perf_counter() - t0
    files = safetensors_files(d)
    warm_gbs = warm_page_cache(files)
    model_config = EngineArgs(model=str(d), dtype=args.dtype, device=device.type, max_model_len=args.max_model_len,
                               load_format="safetensors").create_engine_config().model
    model, _ = build_model(model_config, device, TorchAttentionBackend())
    loads = variants(d, device, dtype, parse_staged(args.staged))
    seconds: dict[str, list[float]] = {k: [] for k in loads}
    matches: dict[str, bool] = {}
    reference = None
    for _rep in range(args.reps):
        for name, make in loads.items():
            seconds[name].append(timed_load(model, make(), str(d), device))
            if reference is None:  # the per-tensor path's parameters: safetensors' own reads
                reference = {n: p.detach().clone() for n, p in model.named_parameters()}
            matches[name] = matches.get(name, True) and same_params(model, reference)
    rows = [{"variant": k, "best_s": min(v), "GB_s": total / min(v) / 1e9, "median_s": sorted(v)[len(v) // 2],
             "matches_per_tensor": matches[k]} for k, v in seconds.items()]
    return {"rows": rows, "checkpoint_bytes": total, "files": len(files), "reused_checkpoint": reused,
            "write_s": write_s, "page_cache_read_GB_s": warm_gbs, "pinned_h2d_GB_s": pinned_h2d_gbs(device),
            "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="bundled config name or a config.json path")
    p.add_argument("--hf-overrides", default="{}", help="config fields to change, as JSON (a smaller shape)")
    p.add_argument("--dir", default="/tmp/weight_load_bench", help="checkpoint directory (kept; reused)")
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--staged", default="64x4,256x3,512x2,64x4:pread,256x3:pread",
                   help="staged variants, comma-separated: <chunk MiB>x<buffers>[:pread]")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    res = run(args)
    written = "reused" if res["reused_checkpoint"] else f"written in {res['write_s']:.1f}s"
    print(f"checkpoint {res['checkpoint_bytes'] / 1e9:.2f} GB in {res['files']} files ({written}); page-cache read "
          f"{res['page_cache_read_GB_s']:.1f} GB/s; pinned H2D {res['pinned_h2d_GB_s']} GB/s")
    print_table(res["rows"], ["variant", "best_s", "median_s", "GB_s", "matches_per_tensor"])
    write_json(args.out, {"benchmark": "weight_load", "args": vars(args), **res})
    return 0 if all(r["matches_per_tensor"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
