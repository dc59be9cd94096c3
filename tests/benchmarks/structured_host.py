"""Structured outputs' host work per step on the CPU: the model runner's grammar step
(``WorkerGrammars.fill``: take in each constrained request's new token, fill the batch's bitmask,
stage it with the row indices) at batch 64, with the SmolLM2 tokenizer, without a model.

    PYTHONPATH=. python tests/benchmarks/structured_host.py --out results/structured_host.json

Each workload replays recorded outputs (the same tokens for every variant): a request joins the
batch with no output and leaves at its output length, a new one taking its row, so the batch stays
at ``--batch`` rows while rows join and leave. Workloads:

- ``open``: structured_throughput.py's schema (an id and a free string); tokens drawn with a seeded
  RNG uniformly from what the grammar allows, so the string closes at random; after the grammar
  terminates the request runs on with EOS (``ignore_eos``) up to its nano output length (100-1024).
- ``text``: the same schema with English text in the string (every row's grammar open all along).
- ``schemas``: the 30 test schemas in turn, each walking its valid instance, then EOS once or twice.

Variants: ``baseline`` is the code of ``--baseline-rev`` (its manager.py and worker.py, read with
``git show``, or from a directory on a machine without the repository's history), ``current`` the
working tree's (``current-pN`` with ``--max-parts N``: BatchFiller's parts); they run alternately
(``--repeats`` rounds), and every step's bitmask and rows must be identical across them. Reported:
per step at the full batch, p50/p99 of the step's time and of the time per constrained row, and the
baseline's p50 over each variant's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "structured_outputs"))

from common import percentiles, write_json  # noqa: E402
from grammar_bench import load_tokenizer  # noqa: E402
from schemas import SCHEMAS  # noqa: E402

from vllm_engine.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402
from vllm_engine.worker.request_states import CachedRequestState  # noqa: E402
from vllm_engine.worker.staging import HostStaging  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# structured_throughput.py's schema (not imported: that module builds engines)
OPEN_SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}, "text": {"type": "string"}},
               "required": ["id", "text"], "additionalProperties": False}
TEXT = ("Structured outputs keep every token of a reply inside what a grammar allows. The engine compiles "
        "the schema once, then at every step it asks the matcher which tokens may come next, packs the "
        "answer into one bit per token and masks the logits before sampling. A small model writes a "
        "long string this way, one token at a time, while the host keeps up with the device. ")
WORKLOADS = ("open", "text", "schemas")


# ---- recorded outputs ------------------------------------------------------------------------------------
class Recorder:
    """Token streams for the workloads, made with a matcher per request (not the code measured)."""

    def __init__(self, tokenizer: Any, manager: Any, seed: int) -> None:
        self.tok, self.manager = tokenizer, manager
        self.eos = tokenizer.eos_token_id
        self.rng = np.random.default_rng(seed)
        self.vocab = len(tokenizer)

    def sampled(self, schema: dict, length: int) -> list[int]:
        """``length`` tokens drawn uniformly from each step's allowed set; EOS once terminated."""
        grammar = self.manager.new_grammar(StructuredOutputsParams(json=schema))
        mask = np.zeros((1, self.manager.bitmask_width), dtype=np.int32)
        out: list[int] = []
        while len(out) < length:
            if grammar.matcher.is_terminated():
                out.append(self.eos)
                continue
            grammar.matcher.fill_next_token_bitmask(mask, 0)
            allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[: self.vocab])
            token = int(self.rng.choice(allowed))
            assert grammar.matcher.accept_token(token)
            out.append(token)
        return out

    def walked(self, text: str, tail: int) -> list[int]:
        """The tokens of ``text``, then EOS ``tail`` times."""
        return self.tok.encode(text, add_special_tokens=False) + [self.eos] * tail

    def workload(self, name: str, cap: int) -> Callable[[int], tuple[dict, list[int]]]:
        """Request ``i`` of the workload (made on first use, then kept): (schema, output tokens), at most
        ``cap`` tokens (a replay of ``cap`` steps takes no more)."""
        made: dict[int, tuple[dict, list[int]]] = {}

        def request(i: int) -> tuple[dict, list[int]]:
            if i not in made:
                made[i] = self._make(name, i, min(cap, int(self.rng.integers(100, 1025))))
            return made[i]
        return request

    def _make(self, name: str, i: int, length: int) -> tuple[dict, list[int]]:
        if name == "open":
            return OPEN_SCHEMA, self.sampled(OPEN_SCHEMA, length)
        if name == "text":
            head, tail = self.walked('{"id": 7, "text": "', 0), self.walked('"}', 1)
            body = self.walked(TEXT * (1 + length // 40), 0)[: max(1, length - len(head) - len(tail))]
            return OPEN_SCHEMA, head + body + tail
        _, schema, instance = SCHEMAS[i % len(SCHEMAS)]
        return schema, self.walked(json.dumps(instance), 1 + i % 2)


# ---- variants --------------------------------------------------------------------------------------------
def load_baseline(rev: str) -> tuple[type, type]:
    """(StructuredOutputManager, WorkerGrammars) of ``rev``'s manager.py and worker.py; ``rev`` is a git
    revision or a directory holding the two files (a copy without git, e.g. on another machine)."""
    def source(name: str) -> str:
        if Path(rev).is_dir():
            return (Path(rev) / name).read_text()
        return subprocess.run(["git", "show", f"{rev}:vllm_engine/structured_output/{name}"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout

    manager = types.ModuleType("baseline_structured_manager")
    exec(compile(source("manager.py"), f"{rev}:manager.py", "exec"), manager.__dict__)
    sys.modules[manager.__name__] = manager
    worker = types.ModuleType("baseline_structured_worker")
    text = source("worker.py").replace("from vllm_engine.structured_output.manager import",
                                       f"from {manager.__name__} import")
    exec(compile(text, f"{rev}:worker.py", "exec"), worker.__dict__)
    return manager.StructuredOutputManager, worker.WorkerGrammars


def load_current(max_parts: Optional[int]) -> tuple:
    """(StructuredOutputManager, WorkerGrammars[, a BatchFiller maker with ``max_parts``])."""
    from vllm_engine.structured_output.manager import BatchFiller, StructuredOutputManager
    from vllm_engine.structured_output.worker import WorkerGrammars

    if max_parts is None:
        return StructuredOutputManager, WorkerGrammars
    return StructuredOutputManager, WorkerGrammars, lambda: BatchFiller(max_parts=max_parts)


class Meta:
    grammar_bitmask = grammar_rows = None


def replay(classes: tuple, tokenizer: Any, request: Callable[[int], tuple[dict, list[int]]],
           batch: int, steps: int, digests: Optional[list[str]]) -> list[tuple[int, float]]:
    """Runs ``steps`` grammar steps over requests 0, 1, ... (rows join as others leave; compiles and
    new matchers are outside the timing); returns (rows, seconds) per step. ``digests``: appended
    (or compared, when already filled) per step."""
    manager_cls, worker_cls, *filler = classes
    manager = manager_cls(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    grammars = worker_cls(None, manager, *(f() for f in filler))
    staging = HostStaging("cpu")
    eos = frozenset([tokenizer.eos_token_id])
    active: list[tuple[CachedRequestState, list[int]]] = []
    nxt, times, check = 0, [], digests is not None and len(digests) > 0

    def join() -> None:
        nonlocal nxt
        schema, tokens = request(nxt)
        rid = f"r{nxt}"
        nxt += 1
        params = SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))
        grammars.grammars[rid] = manager.new_grammar(params.structured_outputs)
        active.append((CachedRequestState(rid, [1], params, 0, eos, 1), tokens))

    for step in range(steps):
        while len(active) < batch:
            join()
        reqs = [r for r, _ in active]
        meta, failed = Meta(), {}
        t0 = time.perf_counter()
        grammars.fill(reqs, meta, staging, lambda: None, failed)
        times.append((len(reqs), time.perf_counter() - t0))
        assert not failed, failed
        mask, rows = meta.grammar_bitmask.numpy(), meta.grammar_rows.numpy()
        digest = hashlib.sha1(mask.tobytes() + rows.tobytes()).hexdigest()
        if check:
            assert digests[step] == digest, f"step {step}: the bitmask differs from the first variant's"
        elif digests is not None:
            digests.append(digest)
        for row, (req, tokens) in enumerate(active):  # "sample" the recorded token: the mask must allow it
            token = tokens[len(req.output_token_ids)]
            assert (int(mask[row, token // 32]) >> (token % 32)) & 1, (req.req_id, token)
            req.output_token_ids.append(token)
        done = [r.req_id for r, t in active if len(r.output_token_ids) == len(t)]
        grammars.finish(done)
        active = [(r, t) for r, t in active if len(r.output_token_ids) < len(t)]
    return times


def summarize(times: list[tuple[int, float]], batch: int) -> dict:
    full = [s for n, s in times if n == batch]
    return {"steps": len(full), "step_us": percentiles([s * 1e6 for s in full], (50, 99)),
            "row_us": percentiles([s / batch * 1e6 for s in full], (50, 99))}


def profile(classes: tuple, tokenizer: Any, request: Callable, batch: int, steps: int) -> None:
    import cProfile
    import pstats

    replay(classes, tokenizer, request, batch, steps, None)  # records the outputs
    prof = cProfile.Profile()
    prof.enable()
    replay(classes, tokenizer, request, batch, steps, None)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer source (default: the SmolLM2 GGUF's)")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the variants, alternating")
    ap.add_argument("--baseline-rev", default="74835c2",
                    help="git revision of the baseline, or a directory with its manager.py and worker.py ('' for none)")
    ap.add_argument("--max-parts", type=int, nargs="+", default=None,
                    help="current code with BatchFiller(max_parts=N), one variant per N (default: its default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="cProfile the current code on each workload instead")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    variants: dict[str, tuple] = {}
    if args.baseline_rev and not args.profile:
        variants["baseline"] = load_baseline(args.baseline_rev)
    for n in args.max_parts or [None]:
        variants["current" if n is None else f"current-p{n}"] = load_current(n)
    current = next(v for v in variants if v.startswith("current"))
    recorder = Recorder(tokenizer, variants[current][0](tokenizer, len(tokenizer), [tokenizer.eos_token_id]),
                        args.seed)
    result: dict[str, Any] = {"batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                              "baseline_rev": args.baseline_rev, "workloads": {}}
    for name in args.workloads:
        request = recorder.workload(name, args.steps)
        if args.profile:
            print(f"== {name}")
            profile(variants[current], tokenizer, request, args.batch, args.steps)
            continue
        times: dict[str, list] = {v: [] for v in variants}
        digests: list[str] = []
        for _ in range(args.repeats):
            for v, classes in variants.items():
                times[v] += replay(classes, tokenizer, request, args.batch, args.steps, digests)
        rows = {v: summarize(t, args.batch) for v, t in times.items()}
        for v in variants:
            r = rows[v]
            if v != "baseline" and "baseline" in rows:
                r["speedup_p50"] = rows["baseline"]["step_us"]["p50"] / r["step_us"]["p50"]
            print(f"{name:8s} {v:11s} per step p50 {r['step_us']['p50']:7.1f} p99 {r['step_us']['p99']:7.1f} us | "
                  f"per row p50 {r['row_us']['p50']:6.2f} p99 {r['row_us']['p99']:6.2f} us ({r['steps']} steps)"
                  + (f" | {r['speedup_p50']:.2f}x the baseline's p50" if "speedup_p50" in r else ""))
        result["workloads"][name] = {"masks_identical_across_variants": True, **rows}
    if not args.profile:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
