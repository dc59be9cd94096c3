"""Host time of n-gram proposing (spec_decode/ngram.propose_ngrams) per step, on this machine's CPU,
for batches of contexts like the nano workload's (Zipf-distributed tokens with a copied span).

    PYTHONPATH=. python tests/benchmarks/ngram_bench.py --baseline-rev 8ccd570 --out results/ngram.json

Each row: batch size, context length, median milliseconds per call of the working tree's
``propose_ngrams`` and of ``--baseline-rev``'s (its ngram.py read with ``git show``), timed in
alternating rounds on the same contexts, and whether both proposed the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_json  # noqa: E402

from vllm_engine.spec_decode.ngram import propose_ngrams  # noqa: E402


def contexts(batch: int, length: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(batch):
        c = np.minimum(rng.zipf(1.2, length), 32000).astype(np.int64)
        span = min(50, length // 4)
        c[length // 2: length // 2 + span] = c[length // 8: length // 8 + span]  # a span to copy later
        out.append(c)
    return out


def baseline(rev: str):
    """``propose_ngrams`` of revision ``rev`` of the package."""
    root = Path(__file__).resolve().parents[2]
    src = subprocess.run(["git", "show", f"{rev}:vllm_engine/spec_decode/ngram.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    module = types.ModuleType("ngram_baseline")
    exec(compile(src, f"{rev}:ngram.py", "exec"), module.__dict__)
    return module.propose_ngrams


def time_calls(fn, ctxs, caps, seconds: float) -> list[float]:
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn(ctxs, 2, 4, caps)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--context-len", type=int, default=1000)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seconds", type=float, default=0.5, help="per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-rev", default="8ccd570", help="the revision before the candidate search")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    old = baseline(args.baseline_rev)
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch_sizes:
        ctxs = contexts(batch, args.context_len, rng)
        caps = [args.k] * batch
        times = {"current": [], "baseline": []}
        for _ in range(args.rounds):
            times["current"] += time_calls(propose_ngrams, ctxs, caps, args.seconds)
            times["baseline"] += time_calls(old, ctxs, caps, args.seconds)
        cur, base = (1e3 * statistics.median(times[k]) for k in ("current", "baseline"))
        rows.append({"batch": batch, "context_len": args.context_len, "ms_p50": cur, "baseline_ms_p50": base,
                     "speedup": base / cur, "same": propose_ngrams(ctxs, 2, 4, caps) == old(ctxs, 2, 4, caps)})
    print_table(rows, ["batch", "context_len", "ms_p50", "baseline_ms_p50", "speedup", "same"])
    write_json(args.out, {"benchmark": "ngram", "k": args.k, "baseline_rev": args.baseline_rev, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
