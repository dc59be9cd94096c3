"""Top GPU kernels of steady decode steps (torch.profiler), to see where a step's GPU time goes;
``--mixed``: of the first steps instead, the prompt chunks (max_num_batched_tokens tokens each).

    PYTHONPATH=. python tests/benchmarks/gpu_kernel_profile.py --model qwen3-0.6b --batch 256
    PYTHONPATH=. python tests/benchmarks/gpu_kernel_profile.py --model qwen3-0.6b --mixed --steps 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import make_workload  # noqa: E402

from vllm_engine import Engine, SamplingParams  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--mixed", action="store_true", help="profile the first steps (prompt chunks), not decode")
    args = p.parse_args(argv)
    e = Engine(model=args.model, load_format="dummy", max_model_len=2048, max_num_seqs=args.batch)
    w = make_workload("random", e.model_config.vocab_size, args.batch, args.input_len, 1)
    params = SamplingParams(temperature=args.temperature, max_tokens=1000, ignore_eos=True, detokenize=False)
    for i, prompt in enumerate(w.prompts):
        e.add_request(str(i), prompt, params)
    for _ in range(0 if args.mixed else 40):  # prefill + warm decode steps
        e.step()
    torch.cuda.synchronize()
    # Wall time of the same number of steps without the profiler: the gap to the summed kernel time
    # below is what the GPU spends between kernels (launch ramps, waiting for the host).
    t0 = time.perf_counter()
    for _ in range(args.steps):
        e.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / args.steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            e.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    # GPU time per step by kind of kernel.
    cats: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if not t or ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        cats.setdefault(cat, [0.0, 0])
        cats[cat][0] += t
        cats[cat][1] += ev.count
    total = sum(v[0] for v in cats.values())
    print(f"GPU time per step: {total / args.steps / 1e3:.3f} ms over {sum(v[1] for v in cats.values()) / args.steps:.0f} kernels; wall time per step without the profiler: {wall_ms:.3f} ms")
    for cat, (t, n) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
        print(f"  {cat:12s} {t / args.steps / 1e3:7.3f} ms  {n / args.steps:6.1f} kernels/step  {100 * t / total:5.1f}%")
    return 0


CATEGORIES = [
    ("attention", ("paged_attention", "_decode", "_prefill", "reduce")),
    ("kv_write", ("reshape_and_cache", "cache_kernel")),
    ("gemm", ("gemm", "cutlass", "sm90", "nvjet", "cublas", "xmma")),
    ("norm", ("rms_norm",)),
    ("rotary", ("rotary",)),
    ("silu_mul", ("silu",)),
    ("sampler", ("sample", "gumbel", "softmax", "argmax", "topk", "sort", "exponential", "max")),
    ("copy", ("copy", "memcpy", "fill", "index", "cat", "gather", "scatter", "elementwise")),
]


if __name__ == "__main__":
    sys.exit(main())
