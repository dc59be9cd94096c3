"""cuBLAS (F.linear) vs. our Triton kernels (every GEMV config for <= 4 rows, every GEMM config above)
on the weight shapes of a decode step, at 1-256 rows: the same timing the engine's LinearPicker does at
startup (L2 flushed before every call), with the achieved weight-read bandwidth, the best config, and
the kernel the picker would choose. Every candidate is also checked against a float64 product.

    PYTHONPATH=. python tests/benchmarks/linear_bench.py --out results/linear.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import print_table, write_json  # noqa: E402

from vllm_engine.layers.triton_linear import LinearPicker  # noqa: E402

SHAPES = {  # (name, N, K) per model: qkv, o, gate_up, down, lm_head
    "llama-3.1-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
                     ("lm_head", 128256, 4096)],
    "qwen3-0.6b": [("qkv", 4096, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072),
                   ("lm_head", 151936, 1024)],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    picker = LinearPicker()
    for model, shapes in SHAPES.items():
        for name, n, k in shapes:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            for m in args.rows:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.double() @ w.double().T
                row = {"model": model, "layer": name, "M": m, "N": n, "K": k}
                candidates = picker.candidates(m)
                for cand, fn in candidates.items():
                    err = ((fn(x, w).double() - ref).abs().max() / ref.abs().max()).item()
                    assert err < 2e-2, (cand, err)
                flush, margin = picker.timing(m)
                # the engine's own timing
                choice, times = picker.decide((model, name, m), candidates, x, w, flush=flush, margin=margin)
                ours = min((c for c in times if c != "cublas"), key=times.get)
                row.update(cublas_us=times["cublas"] * 1e6, ours=ours, ours_us=times[ours] * 1e6,
                           cublas_gbs=n * k * 2 / times["cublas"] / 1e9, ours_gbs=n * k * 2 / times[ours] / 1e9,
                           speedup=times["cublas"] / times[ours], picker=choice,
                           all_us={c: t * 1e6 for c, t in times.items()})
                rows.append(row)
            del w
    print_table(rows, ["model", "layer", "M", "cublas_us", "ours", "ours_us", "cublas_gbs", "ours_gbs", "speedup",
                       "picker"])
    write_json(args.out, {"benchmark": "linear", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
