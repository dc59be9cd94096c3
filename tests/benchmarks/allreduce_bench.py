"""All-reduce cost per call at a decode step's message sizes, over N GPUs (or N CPU processes).

A tensor-parallel decode step all-reduces [tokens, hidden] bf16 twice per layer; at batch 1 that is
16 KiB for an 8,192-wide model, so the call's fixed cost (launch, synchronization between GPUs)
decides, not the link. For each world size this spawns one process per rank and times, per message
size:

* ``nccl_eager_us``: ``dist.all_reduce`` (NCCL) launched one after another, CUDA-event timed;
* ``nccl_graph_us``: the same calls captured in a CUDA graph and replayed (what a decode step in a
  CUDA graph pays);
* ``one_shot_us``: torch's symmetric-memory one-shot all-reduce (every rank reads the others' buffers
  over peer memory; no NVLink multicast), when this torch build has it;
* ``bus_gbs``: NCCL bus bandwidth at a large message (``2 (n - 1) / n * bytes / time``).

  python tests/benchmarks/allreduce_bench.py --world-sizes 2 4 8 --hidden 8192 --out allreduce.json
  python tests/benchmarks/allreduce_bench.py --device cpu --world-sizes 2 --tokens 1 4   # gloo, a check

NVLink multicast stays off: the children inherit this process's environment (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 as the machine sets them; set here too
if missing).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_cuda(fn, iters: int) -> float:
    """Median seconds per call of ``fn`` (CUDA events around batches of 10 calls)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(max(1, iters // 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / 10)
    return statistics.median(samples)


def _time_cpu(fn, iters: int) -> float:
    fn()
    dist.barrier()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _graph_time(x: torch.Tensor, calls: int = 20) -> Optional[float]:
    """Seconds per all-reduce when ``calls`` of them are replayed from one CUDA graph."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            dist.all_reduce(x)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                dist.all_reduce(x)
        return _time_cuda(graph.replay, 20) / calls
    except Exception as e:  # noqa: BLE001 - reported as missing, with the reason, by the caller
        print(f"rank {dist.get_rank()}: NCCL in a CUDA graph failed: {e}", file=sys.stderr)
        return None


def _one_shot(numel: int, dtype: torch.dtype, device: torch.device) -> Optional[Any]:
    """A callable running torch's symmetric-memory one-shot all-reduce on ``numel`` values, or None
    when this torch build (or this machine) does not have it."""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(numel, dtype=dtype, device=device)
        symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
        buf.fill_(1)
        op = torch.ops.symm_mem.one_shot_all_reduce
        return lambda: op(buf, "sum", dist.group.WORLD.group_name)
    except Exception as e:  # noqa: BLE001
        if dist.get_rank() == 0:
            print(f"one-shot all-reduce unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    on_gpu = args.device == "cuda"
    if on_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rows = []
    for tokens in args.tokens:
        x = torch.ones(tokens, args.hidden, dtype=dtype, device=device)
        row = {"tokens": tokens, "bytes": x.numel() * x.element_size()}
        if on_gpu:
            row["nccl_eager_us"] = _time_cuda(lambda: dist.all_reduce(x), args.iters) * 1e6
            graph_s = _graph_time(x)
            row["nccl_graph_us"] = graph_s * 1e6 if graph_s is not None else None
            one_shot = _one_shot(x.numel(), dtype, device)
            row["one_shot_us"] = _time_cuda(one_shot, args.iters) * 1e6 if one_shot is not None else None
        else:
            row["gloo_us"] = _time_cpu(lambda: dist.all_reduce(x), args.iters) * 1e6
        rows.append(row)
    big = torch.ones(args.bus_mib * 2**20 // 2, dtype=torch.bfloat16 if on_gpu else torch.float16, device=device)
    timer = _time_cuda if on_gpu else _time_cpu
    t = timer(lambda: dist.all_reduce(big), 10)
    bus = 2 * (world_size - 1) / world_size * big.numel() * big.element_size() / t / 1e9
    if rank == 0:
        queue.put({"world_size": world_size, "rows": rows, "bus_gbs": bus, "bus_bytes": big.numel() * big.element_size()})
    dist.barrier()
    dist.destroy_process_group()


def run(world_size: int, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    result = queue.get(timeout=args.timeout)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"rank process exited with {p.exitcode}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--hidden", type=int, default=8192, help="model width (Llama-3.1-70B: 8192, 8B: 4096)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256],
                   help="rows of the all-reduced [tokens, hidden] message (a decode step's batch)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--bus-mib", type=int, default=256, help="message size for the bus bandwidth")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    if args.device == "cuda":
        sizes = [n for n in args.world_sizes if n <= torch.cuda.device_count()]
        skipped = sorted(set(args.world_sizes) - set(sizes))
        if skipped:
            print(f"skipping world sizes {skipped}: {torch.cuda.device_count()} GPU(s) here")
    else:
        sizes = args.world_sizes
    result = {"benchmark": "allreduce", "args": vars(args), "env": {k: os.environ.get(k) for k in NO_MULTICAST},
              "runs": []}
    for n in sizes:
        res = run(n, args)
        result["runs"].append(res)
        print(f"world size {n}: bus {res['bus_gbs']:.0f} GB/s")
        for row in res["rows"]:
            print("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
