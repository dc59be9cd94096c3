"""Offline throughput: a whole workload through ``Engine.generate``, against the memory-bandwidth floor
and (``--backend hf`` / ``both``) HF transformers on the same workload in the same run.

    PYTHONPATH=. python tests/benchmarks/throughput.py --model qwen3-0.6b --load-format dummy \
        --dataset nano --runs 3 --backend both --out results/throughput.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from parallel_costs import measure_p2p_gbs, parallel_roofline_seconds  # noqa: E402
from common import (decode_floor_seconds, decode_step_medians, device_name, hf_generate_batch,  # noqa: E402
                    hf_model_from_config, hf_static_generate, linear_choices, make_workload, measure_bandwidth_gbs,
                    measure_gemm_tflops, print_table, sync, write_json)

from vllm_engine import Engine, SamplingParams  # noqa: E402
from vllm_engine.utils import freeze_gc  # noqa: E402


def run_engine(engine: Engine, workload, temperature: float) -> dict:
    engine.scheduler.reset_prefix_cache()  # each run computes its prompts (no hits from the previous run)
    params = [SamplingParams(temperature=temperature, max_tokens=o, ignore_eos=True, detokenize=False)
              for o in workload.output_lens]
    sync()
    t0 = time.perf_counter()
    outs = engine.generate(workload.prompts, params, use_tqdm=False)
    sync()
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert out_tokens == sum(workload.output_lens), "every request must produce exactly its output length"
    return {"seconds": elapsed, "output_tokens": out_tokens,
            "output_tok_s": out_tokens / elapsed,
            "total_tok_s": (out_tokens + sum(workload.input_lens)) / elapsed}


def checkpoint(out: str, result: dict, rows: list[dict]) -> None:
    """Prints the newest row and writes the JSON so far: a run stopped during the (slow) HF part keeps
    what it measured."""
    print("result:", {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    write_json(out, {**result, "rows": rows})


def main(argv=None) -> int:
    try:
        return _main(argv)
    finally:
        gc.unfreeze()  # _main froze its engine's objects (freeze_gc): collectable again once it is gone


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dataset", choices=["nano", "random"], default="nano")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None,
                   help="a quantization method (dummy weights in its default settings: docs/quantization.md)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--speculative-config", default=None,
                   help="speculative decoding, as the engine's flag (JSON; docs/speculative_decoding.md)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--runs", type=int, default=3, help="timed runs (median reported) after a warm-up and a first run of the workload")
    p.add_argument("--backend", choices=["engine", "hf", "both"], default="engine")
    p.add_argument("--hf-num-prompts", type=int, default=64, help="requests run through HF (it is slow)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--hf-modes", default="static,batch",
                   help="HF runs, comma-separated: static (batched generate), batch (continuous generate_batch)")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    modes = set(args.hf_modes.split(","))
    if not modes <= {"static", "batch"}:
        p.error(f"--hf-modes: unknown {sorted(modes - {'static', 'batch'})}; use static and/or batch")

    result: dict = {"benchmark": "throughput", "args": vars(args)}
    rows = []
    bw = measure_bandwidth_gbs()
    result["bandwidth_gbs"] = bw
    peak = measure_gemm_tflops()
    result["gemm_tflops"] = peak
    # The GPU-to-GPU link the all-reduces use (measured before the workers take the GPUs).
    link = measure_p2p_gbs() if args.tensor_parallel_size > 1 else None
    result["link_gbs"] = link
    engine = None
    if args.backend in ("engine", "both"):
        engine = Engine(model=args.model, load_format=args.load_format, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                        enforce_eager=args.enforce_eager, seed=args.seed,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        enable_prefix_caching=args.enable_prefix_caching,
                        tensor_parallel_size=args.tensor_parallel_size, kv_cache_dtype=args.kv_cache_dtype,
                        pipeline_parallel_size=args.pipeline_parallel_size, quantization=args.quantization,
                        speculative_config=args.speculative_config)
        hf_config = engine.model_config.hf_config
        workload = make_workload(args.dataset, hf_config.vocab_size, args.num_prompts, args.input_len,
                                 args.output_len, args.seed)
        warm = make_workload("random", hf_config.vocab_size, min(8, args.num_prompts), 64, 16, args.seed + 1)
        run_engine(engine, warm, args.temperature)
        freeze_gc()  # as `vllm-engine serve` does once its engine is built (undone before HF runs)
        # The first pass over the workload compiles the Triton variants its shapes need (kernels are
        # specialized on split counts, mixed/decode-only, integer arguments): reported, not in the median.
        first = run_engine(engine, workload, args.temperature)
        print(f"first run (includes JIT compiles): {first['seconds']:.2f} s, {first['output_tok_s']:,.0f} output tok/s")
        runs = [run_engine(engine, workload, args.temperature) for _ in range(args.runs - 1)]
        profile = engine.enable_step_profile()  # the last run also records per-step phase times
        runs.append(run_engine(engine, workload, args.temperature))
        engine.step_profile = None
        med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "output_tok_s", "total_tok_s")}
        row = {"backend": "vllm-engine", "requests": len(workload.prompts), **med}
        tp = args.tensor_parallel_size
        if bw:
            # Over tp GPUs: tp times the bandwidth (each rank reads its slice); parallel_costs.py.
            floor_s = decode_floor_seconds(workload.input_lens, workload.output_lens, hf_config, bw * tp,
                                           args.max_num_seqs)
            row["floor_output_tok_s"] = sum(workload.output_lens) / floor_s
            row["fraction_of_floor"] = med["output_tok_s"] / row["floor_output_tok_s"]
            # With the prefill's compute and compute-bound decode steps (at the measured GEMM rate).
            roof_s = parallel_roofline_seconds(workload.input_lens, workload.output_lens, hf_config, bw, peak,
                                               args.max_num_seqs, tp, args.pipeline_parallel_size, link)
            row["roofline_output_tok_s"] = sum(workload.output_lens) / roof_s
            row["fraction_of_roofline"] = med["output_tok_s"] / row["roofline_output_tok_s"]
        stats = engine.get_stats()
        result["linear"] = linear_choices(engine)
        result["engine"] = {"first_run": first, "runs": runs, "median": med, "num_gpu_blocks": engine.num_gpu_blocks,
                            "num_preemptions_total": stats.num_preemptions_total,
                            "step_phases_decode_batch_ge_200": decode_step_medians(profile, 200)}
        if stats.spec_decode is not None:  # speculative decoding's counters over every run
            sd = stats.spec_decode
            result["engine"]["spec_decode"] = {
                "num_drafts": sd.num_drafts, "num_draft_tokens": sd.num_draft_tokens,
                "acceptance_rate": sd.acceptance_rate, "mean_acceptance_length": sd.mean_acceptance_length,
                "accepted_per_position": list(sd.accepted_per_position)}
        rows.append(row)
        checkpoint(args.out, result, rows)
    if args.backend in ("hf", "both"):
        if engine is not None:
            hf_config, dtype = engine.model_config.hf_config, engine.model_config.dtype
            del engine
            gc.unfreeze()  # the engine's objects can be collected again
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        else:
            from vllm_engine.config import EngineArgs

            cfg = EngineArgs(model=args.model, load_format=args.load_format, dtype=args.dtype).create_engine_config()
            hf_config, dtype = cfg.model.hf_config, cfg.model.dtype
        device = "cuda" if torch.cuda.is_available() else "cpu"
        workload = make_workload(args.dataset, hf_config.vocab_size, args.num_prompts, args.input_len,
                                 args.output_len, args.seed)
        sub = type(workload)(workload.name, workload.prompts[: args.hf_num_prompts],
                             workload.output_lens[: args.hf_num_prompts])
        model = hf_model_from_config(hf_config, dtype, device)
        if "static" in modes:
            secs, toks = hf_static_generate(model, sub, args.hf_batch_size, device)
            rows.append({"backend": "hf-generate (static batch)", "requests": len(sub.prompts), "seconds": secs,
                         "output_tok_s": toks / secs,
                         "total_tok_s": (toks + sum(sub.input_lens)) / secs})
            checkpoint(args.out, result, rows)
        gb = None
        if "batch" in modes:
            try:
                gb = hf_generate_batch(model, sub)
            except Exception as e:  # the API moves between transformers versions: report, do not fail the run
                result["hf_generate_batch_error"] = repr(e)[:500]
        if gb is not None:
            secs, toks = gb
            rows.append({"backend": "hf-generate_batch (continuous)", "requests": len(sub.prompts),
                         "seconds": secs, "output_tok_s": toks / secs,
                         "total_tok_s": (toks + sum(sub.input_lens)) / secs})
            checkpoint(args.out, result, rows)
    result["rows"] = rows
    print(f"device: {device_name()}, bandwidth: {bw and round(bw)} GB/s, GEMM {peak and round(peak)} TFLOPS, "
          f"model {args.model}, dataset {args.dataset}")
    if "engine" in result:
        print("decode steps (batch >= 200), median ms:", result["engine"]["step_phases_decode_batch_ge_200"])
    print_table(rows, ["backend", "requests", "seconds", "output_tok_s", "total_tok_s", "floor_output_tok_s",
                       "fraction_of_floor", "roofline_output_tok_s", "fraction_of_roofline"])
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
