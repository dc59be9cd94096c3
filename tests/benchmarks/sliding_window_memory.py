"""KV memory of a long-context run with and without freeing the sliding-window layers' blocks.

The block manager alone decides how much KV memory a run holds, so this drives the real scheduler
and block manager (no model, no GPU: a stand-in runner samples a fixed token) over a long-context
workload, twice: with the model's KV cache groups (core/kv_cache_groups.py: the sliding-window
groups give back what left their window) and with one full-attention table (every layer keeps every
token, as before KV cache groups). Memory = peak blocks in use x a block's bytes (bf16 K/V of the
layers one block spans), at the real model's shapes.

    PYTHONPATH=. python tests/benchmarks/sliding_window_memory.py --model gemma-3-27b \
        --num-requests 4 --prompt-len 32768 --output-len 512
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

GiB = 2**30

# Text-model shapes of the real checkpoints (their config.json).
MODELS: dict[str, dict[str, Any]] = {
    "gemma-2-9b": dict(model_type="gemma2", num_hidden_layers=42, num_key_value_heads=8, head_dim=256,
                       sliding_window=4096, layer_types=["sliding_attention", "full_attention"] * 21),
    "gemma-3-27b": dict(model_type="gemma3_text", num_hidden_layers=62, num_key_value_heads=16, head_dim=128,
                        sliding_window=1024,
                        layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention")
                                     for i in range(62)]),
}


def layer_windows(shape: dict[str, Any]) -> list[Optional[int]]:
    return [shape["sliding_window"] if t == "sliding_attention" else None for t in shape["layer_types"]]


def peak_blocks(groups: tuple, num_blocks: int, block_size: int, num_requests: int, prompt_len: int,
                output_len: int, budget: int) -> tuple[int, int]:
    """(peak blocks in use, scheduler steps) of the workload through the scheduler with ``groups``."""
    from vllm_engine.config import CacheConfig, SchedulerConfig
    from vllm_engine.core.sched_output import ModelRunnerOutput
    from vllm_engine.core.scheduler import Scheduler
    from vllm_engine.engine.request import Request
    from vllm_engine.sampling_params import SamplingParams

    sc = SchedulerConfig(max_num_seqs=num_requests, max_num_batched_tokens=budget,
                         max_model_len=prompt_len + output_len + 1)
    cache = CacheConfig(block_size=block_size, enable_prefix_caching=False, kv_cache_groups=groups)
    s = Scheduler(sc, cache, num_blocks)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    for i in range(num_requests):
        s.add_request(Request(str(i), [(7 * i + j) % 1000 for j in range(prompt_len)], params, max_tokens=output_len))
    peak = steps = 0
    while s.has_unfinished_requests():
        so = s.schedule()
        out = ModelRunnerOutput(req_ids=[r.request_id for r in so.scheduled_requests],
                                sampled_token_ids=[[1] for _ in so.scheduled_requests])
        s.update_from_output(so, out)
        peak = max(peak, num_blocks - s.kv_cache_manager.num_free_blocks)
        steps += 1
    assert s.get_stats().num_preemptions_total == 0, "the pool was too small: the peak would be capped"
    return peak, steps


def measure(model: str, num_requests: int, prompt_len: int, output_len: int, block_size: int = 16,
            budget: int = 8192) -> dict[str, Any]:
    from vllm_engine.core.kv_cache_groups import make_kv_cache_groups

    shape = MODELS[model]
    windows = layer_windows(shape)
    groups = make_kv_cache_groups(windows)
    layer_block_bytes = 2 * shape["num_key_value_heads"] * shape["head_dim"] * block_size * 2  # K and V, bf16
    # Enough blocks that nothing is ever preempted: every token of every request in every group.
    num_blocks = len(groups) * num_requests * -(-(prompt_len + output_len) // block_size)
    full, _ = peak_blocks((), num_blocks, block_size, num_requests, prompt_len, output_len, budget)
    grouped, steps = peak_blocks(groups, num_blocks, block_size, num_requests, prompt_len, output_len, budget)
    full_gib = full * layer_block_bytes * len(windows) / GiB
    grouped_gib = grouped * layer_block_bytes * len(groups[0].layer_ids) / GiB
    return {"model": model, "num_requests": num_requests, "prompt_len": prompt_len, "output_len": output_len,
            "block_size": block_size, "max_num_batched_tokens": budget, "kv_cache_groups": len(groups),
            "layers_per_block": len(groups[0].layer_ids), "steps": steps,
            "full_attention_peak_gib": round(full_gib, 3), "kv_cache_groups_peak_gib": round(grouped_gib, 3),
            "saved_fraction": round(1 - grouped_gib / full_gib, 3)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), nargs="+", default=sorted(MODELS))
    p.add_argument("--num-requests", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=8000)
    p.add_argument("--output-len", type=int, default=192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = p.parse_args(argv)
    for model in args.model:
        print(json.dumps(measure(model, args.num_requests, args.prompt_len, args.output_len, args.block_size,
                                 args.max_num_batched_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
