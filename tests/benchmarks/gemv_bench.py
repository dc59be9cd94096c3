"""cuBLAS (F.linear) vs. the Triton GEMV (fused_ops.triton_gemv) on the weight shapes of a decode step
at batch 1-8: time and achieved bandwidth (weight bytes / time), medians of CUDA-event timings.

    PYTHONPATH=. python tests/benchmarks/gemv_bench.py --out results/gemv.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import print_table, write_json  # noqa: E402

from vllm_engine.layers.fused_ops import triton_gemv  # noqa: E402

SHAPES = {  # (name, N, K) per model: qkv, o, gate_up, down, lm_head
    "llama-3.1-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
                     ("lm_head", 128256, 4096)],
    "qwen3-0.6b": [("qkv", 4096, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072),
                   ("lm_head", 151936, 1024)],
}


def time_us(fn, iters: int = 50) -> float:
    # Rotate over several weight copies larger than L2 in total, so every call streams from HBM.
    for _ in range(3):
        fn(0)
    times = []
    for i in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(i)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for model, shapes in SHAPES.items():
        for name, n, k in shapes:
            copies = max(2, -(-200 * 2**20 // (n * k * 2)))  # >= 200 MiB of weights in rotation
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            for m in args.rows:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x.double(), ws[0].double())
                got = triton_gemv(x, ws[0])
                err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
                t_cublas = time_us(lambda i: F.linear(x, ws[i % copies]))
                t_triton = time_us(lambda i: triton_gemv(x, ws[i % copies]))
                gb = n * k * 2 / 1e9
                rows.append({"model": model, "layer": name, "M": m, "N": n, "K": k, "cublas_us": t_cublas,
                             "triton_us": t_triton, "cublas_gbs": gb / t_cublas * 1e6, "triton_gbs": gb / t_triton * 1e6,
                             "speedup": t_cublas / t_triton, "rel_err": err})
            del ws
    print_table(rows, ["model", "layer", "M", "cublas_us", "triton_us", "cublas_gbs", "triton_gbs", "speedup",
                       "rel_err"])
    write_json(args.out, {"benchmark": "gemv", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
