"""Automatic prefix caching: many requests sharing a long system prompt, caching on vs. off.

200 requests = one shared 2,000-token system prompt + a distinct 100-token question each, all
submitted at once; reports TTFT p50/p99 (from submission), throughput and the prefix-cache hit rate.

    PYTHONPATH=. python tests/benchmarks/prefix_cache.py --model llama-3.1-8b --load-format dummy \
        --out results/prefix_cache.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import device_name, percentiles, print_table, write_json  # noqa: E402

from vllm_engine import Engine, SamplingParams  # noqa: E402


def run(engine: Engine, prompts: list[list[int]], output_len: int, tag: str) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    before = engine.get_stats()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    first: dict[str, float] = {}
    out_tokens = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.outputs[0].token_ids:
                first.setdefault(o.request_id, time.perf_counter())
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
    elapsed = time.perf_counter() - t0
    after = engine.get_stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    ttft = [first[k] - t0 for k in first]
    return {"seconds": elapsed, "output_tok_s": out_tokens / elapsed,
            "total_tok_s": (out_tokens + sum(map(len, prompts))) / elapsed,
            **{f"ttft_ms_{k}": v * 1e3 for k, v in percentiles(ttft, (50, 99)).items()},
            "hit_rate": hits / queries if queries else 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--prefix-len", type=int, default=2000)
    p.add_argument("--question-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    rows = []
    for caching in (True, False):
        engine = Engine(model=args.model, load_format=args.load_format, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager,
                        enable_prefix_caching=caching)
        vocab = engine.model_config.vocab_size
        rng = np.random.default_rng(0)
        prefix = rng.integers(0, vocab, args.prefix_len).tolist()
        prompts = [prefix + rng.integers(0, vocab, args.question_len).tolist() for _ in range(args.num_requests)]
        # Warm-up with the same shapes (another prefix): compiles the kernels' variants for these lengths.
        warm_prefix = rng.integers(0, vocab, args.prefix_len).tolist()
        run(engine, [warm_prefix + rng.integers(0, vocab, args.question_len).tolist() for _ in range(32)],
            args.output_len, "warm")
        rows.append({"prefix_caching": caching, **run(engine, prompts, args.output_len, "run")})
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    on, off = rows
    summary = {"ttft_p50_speedup": off["ttft_ms_p50"] / on["ttft_ms_p50"],
               "throughput_speedup": on["output_tok_s"] / off["output_tok_s"]}
    print(f"device: {device_name()}, model {args.model}, {args.num_requests} requests, shared prefix "
          f"{args.prefix_len} + question {args.question_len} tokens, output {args.output_len}")
    print_table(rows, ["prefix_caching", "seconds", "output_tok_s", "total_tok_s", "ttft_ms_p50", "ttft_ms_p99",
                       "hit_rate"])
    print(f"TTFT p50 {summary['ttft_p50_speedup']:.1f}x lower, throughput {summary['throughput_speedup']:.2f}x higher")
    write_json(args.out, {"benchmark": "prefix_cache", "args": vars(args), "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
