"""Throughput vs. batch size against the memory-bandwidth floor, as a table, JSON and a PNG plot.

For each batch size B: B requests (random tokens, --input-len/--output-len, ignore_eos) run together;
the floor is every decode step reading the weights plus the batch's KV at the measured bandwidth.

    PYTHONPATH=. python tests/benchmarks/batch_sweep.py --model qwen3-0.6b --load-format dummy \
        --out results/sweep.json --plot docs/throughput_vs_batch.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (decode_floor_seconds, device_name, make_workload, measure_bandwidth_gbs,  # noqa: E402
                    print_table, write_json)
from throughput import run_engine  # noqa: E402

from vllm_engine import Engine  # noqa: E402


def plot(rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(bs, [r["output_tok_s"] for r in rows], "o-", label="vllm-engine (measured)")
    if rows[0].get("floor_output_tok_s"):
        ax.plot(bs, [r["floor_output_tok_s"] for r in rows], "k--", label="memory-bandwidth floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (concurrent requests)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)

    engine = Engine(model=args.model, load_format=args.load_format, max_model_len=args.max_model_len,
                    max_num_seqs=max(args.batch_sizes), enable_prefix_caching=False)
    cfg = engine.model_config.hf_config
    bw = measure_bandwidth_gbs()
    run_engine(engine, make_workload("random", cfg.vocab_size, 4, 32, 8, 1), args.temperature)  # warm-up
    rows = []
    for bs in args.batch_sizes:
        w = make_workload("random", cfg.vocab_size, bs, args.input_len, args.output_len, seed=bs)
        r = run_engine(engine, w, args.temperature)
        row = {"batch": bs, "output_tok_s": r["output_tok_s"], "seconds": r["seconds"]}
        if bw:
            row["floor_output_tok_s"] = sum(w.output_lens) / decode_floor_seconds(
                w.input_lens, w.output_lens, cfg, bw, bs)
            row["fraction_of_floor"] = row["output_tok_s"] / row["floor_output_tok_s"]
        rows.append(row)
    title = f"{args.model} (dummy weights, {engine.model_config.dtype}), {device_name()}, in {args.input_len} / out {args.output_len}"
    print(title)
    print_table(rows, ["batch", "seconds", "output_tok_s", "floor_output_tok_s", "fraction_of_floor"])
    write_json(args.out, {"benchmark": "batch_sweep", "args": vars(args), "bandwidth_gbs": bw, "rows": rows})
    if args.plot:
        plot(rows, title, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
