"""Scaling plot for docs/benchmarks.md: batch-1 TPOT speed-up over tp=1 (latency.py JSONs) and
nano output tok/s per layout against its roofline (throughput.py JSONs).

  python tests/benchmarks/plot_scaling.py --latency lat_tp1.json lat_tp2.json ... \
      --throughput tp_70b_tp4.json tp_70b_tp8.json tp_70b_tp2pp2.json --out docs/scaling.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _layout(res: dict) -> tuple[int, int]:
    args = res["args"]
    return args.get("tensor_parallel_size", 1), args.get("pipeline_parallel_size", 1)


def latency_points(paths: list[str]) -> list[tuple[int, float]]:
    """(tp, batch-1 TPOT p50 in ms) per file, sorted by tp."""
    points = []
    for p in paths:
        res = json.loads(Path(p).read_text())
        row = next(r for r in res["rows"] if r["batch"] == 1)
        points.append((_layout(res)[0], row["tpot_ms_p50"]))
    return sorted(points)


def throughput_points(paths: list[str]) -> list[tuple[str, float, float]]:
    """(layout label, output tok/s, roofline tok/s) per file."""
    points = []
    for p in paths:
        res = json.loads(Path(p).read_text())
        row = next(r for r in res["rows"] if r["backend"] == "vllm-engine")
        tp, pp = _layout(res)
        points.append((f"tp={tp}" + (f" x pp={pp}" if pp > 1 else ""), row["output_tok_s"],
                       row.get("roofline_output_tok_s") or float("nan")))
    return points


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency", nargs="*", default=[])
    p.add_argument("--throughput", nargs="*", default=[])
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("latency", "throughput") if getattr(args, k)]
    if not panels:
        p.error("give --latency and/or --throughput files")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        if kind == "latency":
            pts = latency_points(args.latency)
            base = dict(pts).get(1)
            tps = [tp for tp, _ in pts]
            ax.plot(tps, [base / ms for _, ms in pts] if base else [1000 / ms for _, ms in pts], "o-",
                    label="measured")
            if base:
                ax.plot(tps, tps, "--", color="gray", label="linear")
            ax.set_xscale("log", base=2)
            ax.set_xticks(tps, [str(t) for t in tps])
            ax.set_xlabel("tensor-parallel GPUs")
            ax.set_ylabel("batch-1 decode speed-up over tp=1" if base else "batch-1 tokens/s")
            for tp, ms in pts:
                ax.annotate(f"{ms:.2f} ms", (tp, base / ms if base else 1000 / ms), textcoords="offset points",
                            xytext=(4, -12), fontsize=8)
        else:
            pts = throughput_points(args.throughput)
            x = range(len(pts))
            ax.bar([i - 0.2 for i in x], [t for _, t, _ in pts], width=0.4, label="measured")
            ax.bar([i + 0.2 for i in x], [r for _, _, r in pts], width=0.4, label="roofline", color="lightgray")
            ax.set_xticks(list(x), [label for label, _, _ in pts])
            ax.set_ylabel("output tokens/s (nano)")
        ax.legend()
        ax.grid(alpha=0.3)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
