"""Linear kernels timed the way a decode step runs them: inside a CUDA graph, back to back, one
weight matrix per layer (nothing cached in L2), against the same calls timed one by one.

For each layer's linear (q/k/v, o, gate/up, down) and each candidate (cuBLAS, every Triton GEMV
config), a graph of ``--layers`` layers runs all four projections with cuBLAS except that one, which
takes the candidate; the time per call is the difference to the all-cuBLAS graph divided by the
layers, plus the cuBLAS call's own share. Next to it: the candidate timed alone by ``cuda_time_s``
(the LinearPicker's timer) with the L2 flushed by a write and by a read, so the rankings can be
compared.

    PYTHONPATH=. python tests/benchmarks/gemv_stack.py --model llama-3.1-8b --rows 1 4 --out results/gemv_stack.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import device_name, graph_time_s  # noqa: E402

from vllm_engine.layers import triton_linear as L  # noqa: E402
from vllm_engine.model_loader.resolve import resolve_model  # noqa: E402


def shapes(cfg) -> dict[str, tuple[int, int]]:
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h, kvh, hid, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size, cfg.intermediate_size
    return {"qkv": ((h + 2 * kvh) * d, hid), "o": (hid, h * d), "gate_up": (2 * inter, hid), "down": (hid, inter)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = resolve_model(args.model, "dummy").hf_config
    dev, dt = torch.device("cuda"), torch.bfloat16
    shp = shapes(cfg)
    weights = {name: [torch.empty(n, k, dtype=dt, device=dev).uniform_(-0.02, 0.02) for _ in range(args.layers)]
               for name, (n, k) in shp.items()}
    result = {"benchmark": "gemv_stack", "model": args.model, "layers": args.layers, "device": device_name(), "rows": []}
    for m in args.rows:
        x0 = torch.randn(m, cfg.hidden_size, dtype=dt, device=dev) * 0.1
        cands = L.LinearPicker.candidates(m)

        def chain(choice: dict) -> None:
            x = x0
            for i in range(args.layers):
                a = choice["qkv"](x, weights["qkv"][i])
                b = choice["o"](a[:, :shp["o"][1]], weights["o"][i])
                c = choice["gate_up"](b, weights["gate_up"][i])
                x = choice["down"](c[:, :shp["down"][1]], weights["down"][i])

        base = {name: F.linear for name in shp}
        t_base = graph_time_s(lambda: chain(base), args.reps)
        # cuBLAS's own time per call of each kind: the graph without that kind's calls.
        own = {}
        for name in shp:
            skip = dict(base, **{name: (lambda x, w, n=shp[name][0]: x.new_empty(x.shape[0], n))})
            own[name] = (t_base - graph_time_s(lambda: chain(skip), args.reps)) / args.layers
        print(f"rows {m}: all-cuBLAS graph {t_base * 1e3:.3f} ms for {args.layers} layers; per call "
              + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in own.items()), flush=True)
        for name, (n, k) in shp.items():
            x = torch.randn(m, k, dtype=dt, device=dev) * 0.1
            w = weights[name][0]
            ref = F.linear(x, w).float()
            row = {"rows": m, "layer": name, "N": n, "K": k, "graph_us": {}, "alone_us": {}, "alone_read_flush_us": {}}
            for cname, fn in cands.items():
                err = (fn(x, w).float() - ref).abs().max().item()
                if err > 1e-2 * ref.abs().max().item() + 1e-3:
                    raise AssertionError(f"{cname} wrong on {name}: max error {err}")
                t = graph_time_s(lambda: chain(dict(base, **{name: fn})), args.reps)
                row["graph_us"][cname] = round((own[name] + (t - t_base) / args.layers) * 1e6, 2)
                row["alone_us"][cname] = round(L.cuda_time_s(lambda: fn(x, w), flush="write") * 1e6, 2)
                row["alone_read_flush_us"][cname] = round(L.cuda_time_s(lambda: fn(x, w), flush="read") * 1e6, 2)
            best = min(row["graph_us"], key=row["graph_us"].get)
            row["best_in_graph"] = best
            row["best_alone"] = min(row["alone_us"], key=row["alone_us"].get)
            row["best_alone_read_flush"] = min(row["alone_read_flush_us"], key=row["alone_read_flush_us"].get)
            gbs = n * k * 2 / (row["graph_us"][best] * 1e-6) / 1e9
            print(f"  {name:8s} N={n:6d} K={k:6d}: cuBLAS {row['graph_us']['cublas']:6.1f} us in graph "
                  f"({row['alone_us']['cublas']:6.1f} alone); best in graph {best} {row['graph_us'][best]:6.1f} us "
                  f"({gbs:,.0f} GB/s); best alone {row['best_alone']}, with a read flush {row['best_alone_read_flush']}",
                  flush=True)
            result["rows"].append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
