"""Host time of a worker's step input for a decode step of N sequences: applying the step's message
to its request states (``RequestStates.update``) and ``ModelRunner._prepare_inputs``, the numpy work that
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

from vllm_engine.core.sched_output import CachedRequestData, ExecuteModelRequest, NewRequestData  # noqa: E402
from vllm_engine.sampling_params import SamplingParams  # noqa: E402
from vllm_engine.worker.model_runner import ModelRunner  # noqa: E402
from vllm_engine.worker.block_tables import HostBlockTables  # noqa: E402
from vllm_engine.worker.request_states import RequestStates  # noqa: E402
from vllm_engine.worker.staging import HostStaging  # noqa: E402


def decode_step(batch: int, min_len: int, max_len: int, block_size: int, seed: int
                ) -> tuple[ExecuteModelRequest, list[list[int]]]:
    """A decode step of ``batch`` requests, as the worker's first message about them (all new)."""
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.6, max_tokens=max_len, ignore_eos=True)
    new, tables, next_block = [], [], 0
    for i in range(batch):
        length = rng.randint(min_len, max_len)
        n = -(-length // block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
        new.append(NewRequestData(str(i), [rng.randrange(32000) for _ in range(length)], [], params, 0,
                                  frozenset(), tables[-1], length - 1))
    msg = ExecuteModelRequest(req_ids=[d.req_id for d in new], num_scheduled_tokens=[1] * batch,
                              total_num_scheduled_tokens=batch, new_requests=new)
    return msg, tables


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
    msg, tables = decode_step(args.batch, args.min_len, args.max_len, args.block_size, seed=0)
    device = torch.device(args.device)
    requests = RequestStates(HostBlockTables())
    runner = types.SimpleNamespace(block_size=args.block_size, device=device, _last_sample_row={},
                                   _last_sampled=None, _prompt_logprob_rows=ModelRunner._prompt_logprob_rows,
                                   staging=HostStaging(device), requests=requests, num_kv_groups=1)
    # The worker keeps block-table rows across steps: the first message writes them all; in a decode
    # step after it, one request in block_size moves into a new block (the scheduler sends its table).
    states = requests.update(msg)
    ModelRunner._prepare_inputs(runner, msg, states)
    rng = random.Random(1)
    ids = msg.req_ids
    times = []
    for _ in range(args.reps):
        moved = set(rng.sample(range(len(ids)), max(1, len(ids) // args.block_size)))
        step = ExecuteModelRequest(
            req_ids=ids, num_scheduled_tokens=[1] * len(ids), total_num_scheduled_tokens=len(ids),
            cached_requests=CachedRequestData(list(ids), [s.num_computed_tokens for s in states],
                                              [tables[i] if i in moved else None for i in range(len(ids))]))
        t0 = time.perf_counter()
        ModelRunner._prepare_inputs(runner, step, requests.update(step))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times) * 1e3
    blocks = sum(map(len, tables))
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"prepare_inputs on {device.type}, {args.batch} decodes ({blocks} blocks in their tables): median {med:.3f} ms "
          f"over {args.reps} calls")
    write_json(args.out, {"benchmark": "host_prepare", "args": vars(args), "blocks": blocks, "median_ms": med})
    return 0


if __name__ == "__main__":
    sys.exit(main())
