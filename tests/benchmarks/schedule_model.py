"""Which scheduler settings a workload wants, by a cost model instead of a GPU: the nano workload
under FCFS with a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``),
each step priced from the bytes it reads and the FLOPs it does.

A step of ``rows`` scheduled tokens, ``sampled`` sampled rows and ``context`` decode context tokens costs

    layers' GEMMs  max(weights / (bandwidth * gemm_bw_eff), rows * linear FLOPs / gemm_tflops)
  + LM head        max(its bytes / bandwidth, sampled rows' FLOPs / gemm_tflops)
  + attention      context * KV bytes per token / bandwidth + prefill attention FLOPs / attn_tflops
  + a fixed cost   per step (norms, elementwise kernels, sampler, kernel boundaries)

The scheduler is the engine's rule in small: running requests first (a decode, or the next chunk of
a prompt), then waiting ones in arrival order while budget and cap allow. It answers questions such
as "would prefill spread over the decode steps (a small budget) or fewer sequences at once beat
prefilling everything up front?" for a given GPU (defaults: an H100's measured 2,970 GB/s and about
700 TFLOPS for cuBLAS at these shapes).

    PYTHONPATH=. python tests/benchmarks/schedule_model.py --model llama-3.1-8b
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (attention_flops, kv_bytes_per_token, linear_flops_per_token, make_workload,  # noqa: E402
                    print_table, weight_bytes, write_json)


@dataclass(frozen=True)
class Gpu:
    bandwidth_gbs: float = 2970.0
    gemm_tflops: float = 700.0
    gemm_bw_eff: float = 0.85  # fraction of the copy bandwidth the GEMMs stream weights at (in a graph)
    attn_tflops: float = 200.0  # the prefill attention kernel's rate (prefill_attn_bench.py)
    step_fixed_s: float = 0.6e-3


def step_seconds(cfg: Any, gpu: Gpu, rows: int, sampled: int, context: int, prefill_attn_flops: float) -> float:
    bw, peak = gpu.bandwidth_gbs * 1e9, gpu.gemm_tflops * 1e12
    lm_bytes = 2 * cfg.vocab_size * cfg.hidden_size
    layers_bytes = weight_bytes(cfg) - lm_bytes
    gemm = max(layers_bytes / (bw * gpu.gemm_bw_eff), rows * linear_flops_per_token(cfg) / peak)
    lm_head = max(lm_bytes / bw, sampled * lm_bytes / peak)  # 2 FLOPs per weight and row = its bytes in bf16
    attn = context * kv_bytes_per_token(cfg) / bw + prefill_attn_flops / (gpu.attn_tflops * 1e12)
    return gemm + lm_head + attn + gpu.step_fixed_s


def simulate(cfg: Any, gpu: Gpu, input_lens: list[int], output_lens: list[int], max_num_batched_tokens: int,
             max_num_seqs: int) -> dict:
    """Runs the workload to the end; returns seconds, steps and the tokens each request produced."""
    n = len(input_lens)
    computed, produced = [0] * n, [0] * n
    waiting, running = list(range(n))[::-1], []
    seconds, steps = 0.0, 0
    step: dict = {}

    def schedule(i: int) -> None:
        """Request i's tokens of this step: the next chunk of its prompt, or one decode."""
        if computed[i] < input_lens[i]:
            take = min(input_lens[i] - computed[i], step["budget"])
            step["attn"] += attention_flops(cfg, computed[i], computed[i] + take)
        else:  # a decode: one token over the context so far
            take = 1
            step["context"] += computed[i]
        computed[i] += take
        step["budget"] -= take
        step["rows"] += take
        if computed[i] >= input_lens[i]:
            step["sampled"] += 1
            produced[i] += 1

    while waiting or running:
        step.update(budget=max_num_batched_tokens, rows=0, sampled=0, context=0, attn=0.0)
        for i in running:
            if step["budget"] <= 0:
                break
            schedule(i)
        while waiting and step["budget"] > 0 and len(running) < max_num_seqs:
            running.append(waiting.pop())
            schedule(running[-1])
        seconds += step_seconds(cfg, gpu, step["rows"], step["sampled"], step["context"], step["attn"])
        steps += 1
        running = [i for i in running if produced[i] < output_lens[i]]
    return {"seconds": seconds, "steps": steps, "produced": produced}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b", help="a bundled config name")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--settings", nargs="+", default=["8192:256", "16384:256", "2048:256", "1024:256", "512:256",
                                                     "8192:192", "8192:128", "512:128"],
                   help="max_num_batched_tokens:max_num_seqs pairs")
    p.add_argument("--bandwidth-gbs", type=float, default=Gpu.bandwidth_gbs)
    p.add_argument("--gemm-tflops", type=float, default=Gpu.gemm_tflops)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from vllm_engine.model_loader.resolve import resolve_model

    cfg = resolve_model(args.model, "dummy").hf_config
    gpu = Gpu(bandwidth_gbs=args.bandwidth_gbs, gemm_tflops=args.gemm_tflops)
    wl = make_workload("nano", cfg.vocab_size, args.num_prompts, 0, 0, seed=0)
    rows = []
    for setting in args.settings:
        budget, cap = (int(v) for v in setting.split(":"))
        r = simulate(cfg, gpu, wl.input_lens, wl.output_lens, budget, cap)
        rows.append({"max_num_batched_tokens": budget, "max_num_seqs": cap, "steps": r["steps"],
                     "seconds": round(r["seconds"], 2), "output_tok_s": round(sum(wl.output_lens) / r["seconds"])})
    print(f"model {args.model}, nano workload ({args.num_prompts} requests), {gpu}")
    print_table(rows, list(rows[0]))
    write_json(args.out, {"benchmark": "schedule_model", "model": args.model, "gpu": gpu.__dict__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
