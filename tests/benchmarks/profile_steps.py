"""Where a decode step's time goes: per-phase medians (engine step profile) and a cProfile of the run.

    PYTHONPATH=. python tests/benchmarks/profile_steps.py --model qwen3-0.6b --batch 256
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import STEP_PHASES, decode_step_medians, make_workload  # noqa: E402

from vllm_engine import Engine, SamplingParams  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    e = Engine(model=args.model, load_format="dummy", max_model_len=2048, max_num_seqs=args.batch,
               enforce_eager=args.enforce_eager)
    w = make_workload("random", e.model_config.vocab_size, args.batch, args.input_len, args.output_len)
    params = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True, detokenize=False) for o in w.output_lens]
    e.generate(w.prompts, params, use_tqdm=False)  # warm-up
    prof = e.enable_step_profile()
    pr = cProfile.Profile()
    if args.top:
        pr.enable()
    t0 = time.perf_counter()
    e.generate(w.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    pr.disable()
    med = decode_step_medians(prof, args.batch, args.batch)
    print(f"elapsed {elapsed:.2f}s, {len(prof)} steps, {med['steps']} full decode steps")
    for k in STEP_PHASES:
        print(f"  {k:22s} median {med[k]:.3f}")
    if args.top:
        pstats.Stats(pr).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
