"""The cost of verifying proposals and rolling back, at a forced acceptance rate: TPOT with k
proposed tokens per request and step, each accepted with probability --acceptance (independently,
until the first rejection), against speculation off. Dummy weights at a real model's shapes.

    PYTHONPATH=. python tests/benchmarks/spec_verify_cost.py --model llama-3.1-8b --load-format dummy \
        --k 2 4 --acceptance 0.5 0.7 0.9 --batch-sizes 1 --output-len 128 --out results/spec_verify_cost.json

Benchmark-only machinery, here and not in the package: a proposer that proposes k tokens for every
request every step (no draft model: the proposing cost is ~0, so this is the target's side of a
draft-model setup), and a wrapper around the runner's verification that runs it (its cost counts)
and then replaces its decisions with the forced ones. Runs in the engine's process (uni executor).
The row's ``mean_acceptance_length`` is the engine's own counter: (1 - a^(k+1)) / (1 - a) expected.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, print_table, step_costs, write_json  # noqa: E402

from vllm_engine import Engine, SamplingParams  # noqa: E402
from vllm_engine.worker import model_runner as model_runner_module  # noqa: E402


class FixedProposer:
    """Proposes k copies of the request's last token, capped as asked (the engine's caps)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def propose(self, req_ids, token_ids, max_drafts):
        return [[toks[-1]] * min(self.k, cap) for toks, cap in zip(token_ids, max_drafts)]


@contextlib.contextmanager
def forced_acceptance(alpha: float, seed: int = 0):
    """Within: every verification runs (its cost counts, greedy path or rejection sampler), then its
    result is replaced: each request keeps its proposals up to the first of independent
    Bernoulli(alpha) rejections, then one more token (a real one: its first row's result)."""
    real = model_runner_module.verify
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def forced(logits, states, req_indices, num_drafts, spec, *args, **kwargs):
        step = real(logits, states, req_indices, num_drafts, spec, *args, **kwargs)
        device = logits.device
        B, K = len(num_drafts), max(num_drafts, default=0)
        ok = torch.rand(B, K, generator=gen) < alpha
        cols = torch.arange(K).unsqueeze(0)
        ok &= cols < torch.tensor(num_drafts).unsqueeze(1)
        num_accepted = ok.to(torch.int64).cumprod(dim=1).sum(dim=1)
        drafts = torch.zeros(B, K, dtype=torch.int64)
        for b, (st, k) in enumerate(zip(states, num_drafts)):
            drafts[b, :k] = torch.tensor(spec.get(st.req_id, [])[:k], dtype=torch.int64)
        tokens = torch.full((B, K + 1), -1, dtype=torch.int64)
        tokens[:, :K] = torch.where(cols < num_accepted.unsqueeze(1), drafts, -1)
        tokens, num_accepted = tokens.to(device), num_accepted.to(device)
        if step.greedy_ids is not None:
            final = step.greedy_ids[torch.tensor(step.first_row, device=device)]
        else:
            final = step.token_ids[:, 0].clamp_min(0)
        tokens.scatter_(1, num_accepted.unsqueeze(1), final.unsqueeze(1))
        step.token_ids, step.greedy_ids, step.drafts = tokens, None, None
        if step.copied is not None:  # the host copy of the forced tokens instead
            step.host = torch.empty(tokens.shape, dtype=torch.int64, pin_memory=True)
            step.host.copy_(tokens, non_blocking=True)
            step.copied = torch.cuda.Event()
            step.copied.record()
        return step

    model_runner_module.verify = forced
    try:
        yield
    finally:
        model_runner_module.verify = real


def measure(engine: Engine, batch: int, input_len: int, output_len: int, vocab: int, tag: str,
            costs: dict | None = None) -> float:
    """Median TPOT (seconds) of ``batch`` requests run together to ``output_len`` tokens; ``costs``:
    filled with the verifying and plain steps' costs (common.step_costs) when given."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    runner = engine.model_runner
    if costs is not None:
        profile = engine.enable_step_profile()
        if runner is not None and runner.device.type == "cuda":
            runner.gpu_timeline = []
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", torch.randint(0, vocab, (input_len,), generator=g).tolist(), params)
    first, last, count = {}, {}, {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            n = len(o.outputs[0].token_ids)
            if n:
                first.setdefault(o.request_id, (now, n))
                last[o.request_id], count[o.request_id] = now, n
    tpots = [(last[r] - first[r][0]) / (count[r] - first[r][1]) for r in first if count[r] > first[r][1]]
    if costs is not None:
        costs.update(step_costs(profile, runner.gpu_timeline if runner is not None else None))
        engine.step_profile = None
        if runner is not None:
            runner.gpu_timeline = None
    return statistics.median(tpots)


def make_engine(args, k: int | None) -> Engine:
    spec = None if k is None else {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1,
                                   "prompt_lookup_max": 1, "adaptive": False}
    engine = Engine(model=args.model, load_format=args.load_format, dtype=args.dtype,
                    max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, speculative_config=spec)
    if k is not None:
        engine.proposer = FixedProposer(k)
    return engine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--k", type=int, nargs="+", default=[2, 4])
    p.add_argument("--acceptance", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    rows = []
    engine = make_engine(args, None)
    vocab = engine.model_config.vocab_size
    measure(engine, 1, args.input_len, 8, vocab, "warm")
    base, base_costs = {}, {}
    for b in args.batch_sizes:
        base_costs[b] = {}
        base[b] = measure(engine, b, args.input_len, args.output_len, vocab, f"off{b}", base_costs[b])
        rows.append({"k": 0, "acceptance": None, "batch": b, "tpot_ms": 1e3 * base[b], "tpot_speedup": 1.0,
                     "plain_step_ms": base_costs[b]["plain_step"].get("total_ms"),
                     "plain_step_gpu_ms": base_costs[b]["plain_step"].get("gpu_ms"), **base_costs[b]})
    engine.shutdown()
    del engine
    gc.collect()
    for k in args.k:
        engine = make_engine(args, k)
        measure(engine, 1, args.input_len, 8, vocab, "warm")
        for alpha in args.acceptance:
            for b in args.batch_sizes:
                before = engine.get_stats().spec_decode
                drafts0, acc0 = before.num_drafts, before.num_accepted_tokens
                costs: dict = {}
                with forced_acceptance(alpha):
                    tpot = measure(engine, b, args.input_len, args.output_len, vocab, f"k{k}a{alpha}b{b}", costs)
                st = engine.get_stats().spec_decode
                drafts, accepted = st.num_drafts - drafts0, st.num_accepted_tokens - acc0
                rows.append({"k": k, "acceptance": alpha, "batch": b, "tpot_ms": 1e3 * tpot,
                             "tpot_speedup": base[b] / tpot,
                             "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
                             "expected_acceptance_length": (1 - alpha ** (k + 1)) / (1 - alpha),
                             "verify_step_ms": costs["verify_step"].get("total_ms"),
                             "verify_step_gpu_ms": costs["verify_step"].get("gpu_ms"), **costs})
        engine.shutdown()
        del engine
        gc.collect()
    print_table(rows, ["k", "acceptance", "batch", "tpot_ms", "tpot_speedup", "mean_acceptance_length",
                       "expected_acceptance_length", "plain_step_ms", "plain_step_gpu_ms", "verify_step_ms",
                       "verify_step_gpu_ms"])
    write_json(args.out, {"device": device_name(), "model": args.model, "input_len": args.input_len,
                          "output_len": args.output_len, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
