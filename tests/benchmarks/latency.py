"""Latency at batch 1 and small batches: time to first token (TTFT) and time per output token (TPOT)
percentiles, with the batch-1 decode floor (weights + KV bytes per step over the measured bandwidth).

    PYTHONPATH=. python tests/benchmarks/latency.py --model llama-3.1-8b --load-format dummy \
        --input-len 1000 --output-len 128 --batch-sizes 1 4 16 --runs 5 --out results/latency.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parallel_costs import decode_step_floor_seconds, measure_p2p_gbs  # noqa: E402
from common import (device_name, linear_choices, make_workload, measure_bandwidth_gbs,  # noqa: E402
                    percentiles, print_table, write_json)

from vllm_engine import Engine, SamplingParams  # noqa: E402
from vllm_engine.utils import freeze_gc  # noqa: E402


def one_batch(engine: Engine, prompts: list[list[int]], output_len: int, tag: str) -> tuple[list[float], list[float]]:
    """Runs one batch to completion; returns per-request TTFT and mean TPOT (seconds)."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()  # step() ends with a host copy of the sampled ids: the GPU work is done
        for o in outs:
            if o.outputs[0].token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
    ttft = [first[k] - t0 for k in first]
    tpot = [(last[k] - first[k]) / (output_len - 1) for k in first if output_len > 1]
    return ttft, tpot


def main(argv=None) -> int:
    try:
        return _main(argv)
    finally:
        gc.unfreeze()  # _main froze its engine's objects (freeze_gc): collectable again once it is gone


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None,
                   help="a quantization method (dummy weights in its default settings: docs/quantization.md)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    engine = Engine(model=args.model, load_format=args.load_format, dtype=args.dtype, max_model_len=args.max_model_len,
                    max_num_seqs=max(args.batch_sizes), enforce_eager=args.enforce_eager,
                    enable_prefix_caching=False, quantization=args.quantization,
                    tensor_parallel_size=args.tensor_parallel_size, kv_cache_dtype=args.kv_cache_dtype,
                    pipeline_parallel_size=args.pipeline_parallel_size)
    cfg = engine.model_config.hf_config
    bw = measure_bandwidth_gbs()
    link = measure_p2p_gbs() if args.tensor_parallel_size > 1 else None
    rows, result = [], {"benchmark": "latency", "args": vars(args), "bandwidth_gbs": bw, "link_gbs": link}
    # Warm-up at the measured shapes: the first prompt of a new length compiles kernel variants.
    for bs in args.batch_sizes:
        one_batch(engine, make_workload("random", cfg.vocab_size, bs, args.input_len, 8, 99).prompts, 8, f"warm{bs}")
    freeze_gc()  # as `vllm-engine serve` does once its engine is built
    for bs in args.batch_sizes:
        ttfts, tpots = [], []
        for run in range(args.runs):
            w = make_workload("random", cfg.vocab_size, bs, args.input_len, args.output_len, seed=run)
            t, d = one_batch(engine, w.prompts, args.output_len, f"b{bs}r{run}")
            ttfts += t
            tpots += d
        row = {"batch": bs, **{f"ttft_ms_{k}": v * 1e3 for k, v in percentiles(ttfts).items()},
               **{f"tpot_ms_{k}": v * 1e3 for k, v in percentiles(tpots).items()}}
        if bw:
            mid_ctx = args.input_len + args.output_len / 2
            floor = decode_step_floor_seconds(cfg, bs, mid_ctx, bw, args.tensor_parallel_size, link)
            row["tpot_floor_ms"] = floor * 1e3
            row["tpot_p50_over_floor"] = statistics.median(tpots) / floor
        rows.append(row)
    result["rows"] = rows
    result["linear"] = linear_choices(engine)
    print(f"device: {device_name()}, bandwidth {bw and round(bw)} GB/s, model {args.model}, "
          f"input {args.input_len}, output {args.output_len}")
    print_table(rows, ["batch", "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p90",
                       "tpot_ms_p99", "tpot_floor_ms", "tpot_p50_over_floor"])
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
