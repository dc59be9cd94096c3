"""Where the GPU's time goes over a whole workload: busy per kind of step, and idle gaps between steps.

CUDA events are recorded at the start of every launched step, after its input preparation (just
before the forward), and at its end (``ModelRunner.gpu_timeline``). The gap between one step's end
and the next one's start, and the time from a step's start to its forward (the input copies, and the
GPU waiting while the host prepares them), are time the GPU waited for the host.

    PYTHONPATH=. python tests/benchmarks/gpu_timeline.py --model qwen3-0.6b --dataset nano
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import make_workload, write_json  # noqa: E402

from vllm_engine import Engine, SamplingParams  # noqa: E402

BUCKETS = [(1, 16), (17, 64), (65, 128), (129, 192), (193, 256)]


def summarize(timeline: list, wall_s: float) -> dict:
    steps = []
    for i, (n, t, start, forward, end) in enumerate(timeline):
        busy = forward.elapsed_time(end)
        inputs = start.elapsed_time(forward)
        gap = timeline[i - 1][-1].elapsed_time(start) if i else 0.0
        steps.append({"num_seqs": n, "num_tokens": t, "decode": n == t, "busy_ms": busy, "inputs_ms": inputs,
                      "gap_ms": max(gap, 0.0)})
    out = {"wall_s": wall_s, "steps": len(steps),
           "busy_s": sum(s["busy_ms"] for s in steps) / 1e3, "idle_s": sum(s["gap_ms"] for s in steps) / 1e3,
           "inputs_s": sum(s["inputs_ms"] for s in steps) / 1e3}
    for kind, sel in (("mixed", [s for s in steps if not s["decode"]]), ("decode", [s for s in steps if s["decode"]])):
        out[kind] = {"steps": len(sel), "busy_s": sum(s["busy_ms"] for s in sel) / 1e3,
                     "idle_before_s": sum(s["gap_ms"] for s in sel) / 1e3,
                     "inputs_s": sum(s["inputs_ms"] for s in sel) / 1e3,
                     "tokens": sum(s["num_tokens"] for s in sel)}
    dec = [s for s in steps if s["decode"]]
    out["decode_by_batch"] = []
    for lo, hi in BUCKETS:
        sel = [s for s in dec if lo <= s["num_seqs"] <= hi]
        if sel:
            out["decode_by_batch"].append({
                "batch": f"{lo}-{hi}", "steps": len(sel), "busy_s": sum(s["busy_ms"] for s in sel) / 1e3,
                "busy_ms_median": statistics.median(s["busy_ms"] for s in sel),
                "gap_ms_median": statistics.median(s["gap_ms"] for s in sel),
                "inputs_ms_median": statistics.median(s["inputs_ms"] for s in sel),
                "idle_s": sum(s["gap_ms"] for s in sel) / 1e3})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--dataset", default="nano")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    e = Engine(model=args.model, load_format="dummy", max_model_len=args.max_model_len,
               max_num_batched_tokens=args.max_num_batched_tokens)
    w = make_workload(args.dataset, e.model_config.vocab_size, args.num_prompts, args.input_len, args.output_len)
    params = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True, detokenize=False) for o in w.output_lens]
    e.generate(w.prompts, params, use_tqdm=False)  # warm-up (compiles)
    e.scheduler.reset_prefix_cache()
    e.model_runner.gpu_timeline = timeline = []
    host = e.enable_step_profile()  # the host's phases per step, next to the GPU's
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    e.generate(w.prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    e.model_runner.gpu_timeline = None
    e.step_profile = None
    res = summarize(timeline, wall)
    for row in res["decode_by_batch"]:
        lo, hi = (int(v) for v in row["batch"].split("-"))
        sel = [h for h in host if h["num_seqs"] == h["num_tokens"] and lo <= h["num_seqs"] <= hi]
        for k in ("schedule_ms", "prepare_inputs_ms", "execute_ms", "total_ms"):
            row["host_" + k + "_median"] = statistics.median(h[k] for h in sel) if sel else None
    res["output_tok_s"] = sum(w.output_lens) / wall
    res["args"] = vars(args)
    for k in ("wall_s", "output_tok_s", "steps", "busy_s", "idle_s", "inputs_s", "mixed", "decode"):
        print(f"{k}: {res[k]}")
    for row in res["decode_by_batch"]:
        print("  decode", row)
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
