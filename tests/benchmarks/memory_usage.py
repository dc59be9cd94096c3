"""KV cache memory use of paged attention on a workload (default: the nano workload).

Reports how many sequences the cache holds with paging versus a contiguous max_model_len allocation
per sequence, and, sampled at every step of the run, block utilisation (tokens stored / slots of the
blocks held by running requests) and internal fragmentation (1 - utilisation).

    PYTHONPATH=. python tests/benchmarks/memory_usage.py --model qwen3-0.6b --load-format dummy \
        --out results/memory.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, make_workload, print_table, write_json  # noqa: E402

from vllm_engine import Engine, SamplingParams  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dataset", choices=["nano", "random"], default="nano")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    engine = Engine(model=args.model, load_format=args.load_format, max_model_len=args.max_model_len,
                    max_num_seqs=args.max_num_seqs, block_size=args.block_size)
    w = make_workload(args.dataset, engine.model_config.vocab_size, args.num_prompts, args.input_len,
                      args.output_len)
    for i, (prompt, out_len) in enumerate(zip(w.prompts, w.output_lens)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True,
                                                           detokenize=False))
    bs = args.block_size
    utilisation, running_counts = [], []
    while engine.has_unfinished_requests():
        engine.step()
        running = list(engine.scheduler.running)
        if not running:
            continue
        stored = sum(r.num_computed_tokens for r in running)
        slots = sum(len(engine.scheduler.kv_cache_manager.get_block_ids(r)) for r in running) * bs
        utilisation.append(stored / slots)
        running_counts.append(len(running))
    total_slots = engine.num_gpu_blocks * bs
    mean_len = statistics.mean(i + o for i, o in zip(w.input_lens, w.output_lens))
    row = {
        "kv_blocks": engine.num_gpu_blocks, "kv_tokens": total_slots,
        "seqs_fit_contiguous": total_slots // args.max_model_len,
        "seqs_fit_paged_mean_len": int(total_slots // mean_len),
        "peak_running": max(running_counts),
        "utilisation_mean": statistics.mean(utilisation), "utilisation_min": min(utilisation),
        "fragmentation_mean": 1 - statistics.mean(utilisation),
    }
    print(f"device: {device_name()}, model {args.model}, dataset {args.dataset}, block size {bs}, "
          f"max_model_len {args.max_model_len}")
    print_table([row], list(row))
    write_json(args.out, {"benchmark": "memory_usage", "args": vars(args), "result": row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
