"""Top GPU kernels of steady decode steps (torch.profiler), to see where a step's GPU time goes.

    PYTHONPATH=. python tests/benchmarks/gpu_kernel_profile.py --model qwen3-0.6b --batch 256
"""

from __future__ import annotations

import argparse
import sys
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
    args = p.parse_args(argv)
    e = Engine(model=args.model, load_format="dummy", max_model_len=2048, max_num_seqs=args.batch)
    w = make_workload("random", e.model_config.vocab_size, args.batch, args.input_len, 1)
    params = SamplingParams(temperature=args.temperature, max_tokens=1000, ignore_eos=True, detokenize=False)
    for i, prompt in enumerate(w.prompts):
        e.add_request(str(i), prompt, params)
    for _ in range(40):  # prefill + warm decode steps
        e.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            e.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
