"""Host time of ``ModelRunner._prepare_inputs`` for a decode step of N sequences: the numpy work that
builds token ids, positions, block tables (the rows kept across steps, 1 in ``block_size`` of them
rewritten, as in a decode step), slot mapping and sampled rows, and (``--device cuda``)
packing them into pinned memory and queuing their one host-to-device copy.

    PYTHONPATH=. python tests/benchmarks/host_prepare.py --batch 256 --out results/host_prepare.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import write_json  # noqa: E402

from vllm_engine.core.sched_output import SchedulerOutput  # noqa: E402
from vllm_engine.engine.request import Request  # noqa: E402
from vllm_engine.sampling_params import SamplingParams  # noqa: E402
from vllm_engine.worker.model_runner import ModelRunner  # noqa: E402
from vllm_engine.worker.block_tables import HostBlockTables  # noqa: E402
from vllm_engine.worker.staging import HostStaging  # noqa: E402


def decode_step(batch: int, min_len: int, max_len: int, block_size: int, seed: int) -> SchedulerOutput:
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.6, max_tokens=max_len, ignore_eos=True)
    reqs, tables, next_block = [], [], 0
    for i in range(batch):
        length = rng.randint(min_len, max_len)
        r = Request(str(i), [rng.randrange(32000) for _ in range(length)], params)
        r.num_computed_tokens = length - 1
        reqs.append(r)
        n = -(-length // block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    return SchedulerOutput(scheduled_requests=reqs, num_scheduled_tokens=[1] * batch, block_tables=tables,
                           total_num_scheduled_tokens=batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--min-len", type=int, default=200)
    p.add_argument("--max-len", type=int, default=2000)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: the host time includes packing into pinned memory and queuing the one copy")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sched = decode_step(args.batch, args.min_len, args.max_len, args.block_size, seed=0)
    device = torch.device(args.device)
    runner = types.SimpleNamespace(block_size=args.block_size, device=device, _last_sample_row={},
                                   _last_sampled=None, _prompt_logprob_rows=ModelRunner._prompt_logprob_rows,
                                   staging=HostStaging(device), host_tables=HostBlockTables())
    # The runner keeps block-table rows across steps: the first call writes them all; in a decode step
    # after it, one request in block_size moves into a new block (its table changed).
    ModelRunner._prepare_inputs(runner, sched)
    rng = random.Random(1)
    ids = [r.request_id for r in sched.scheduled_requests]
    times = []
    for _ in range(args.reps):
        sched.changed_block_tables = set(rng.sample(ids, max(1, len(ids) // args.block_size)))
        t0 = time.perf_counter()
        ModelRunner._prepare_inputs(runner, sched)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times) * 1e3
    blocks = sum(map(len, sched.block_tables))
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"prepare_inputs on {device.type}, {args.batch} decodes ({blocks} blocks in their tables): median {med:.3f} ms "
          f"over {args.reps} calls")
    write_json(args.out, {"benchmark": "host_prepare", "args": vars(args), "blocks": blocks, "median_ms": med})
    return 0


if __name__ == "__main__":
    sys.exit(main())
