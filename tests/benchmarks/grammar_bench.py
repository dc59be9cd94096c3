"""xgrammar vs llguidance on the CPU: grammar compile time and per-token mask time for JSON schemas.

For each schema of tests/structured_outputs/schemas.py (or the first ``--num-schemas``), with a real
tokenizer (the SmolLM2 GGUF's by default, or ``--tokenizer`` a HF directory / hub id):

- compile: a cold compile (no cache) of the schema into a matcher-ready grammar, and the time to the
  first mask (llguidance compiles lazily: its first mask pays for what xgrammar does up front);
- mask: the schema's valid instance is tokenized and walked token by token; at each position the
  time to fill the next-token bitmask, then the token is accepted.

Prints a table and writes JSON (p50/p99 in ms). ``PYTHONPATH=. python tests/benchmarks/grammar_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "structured_outputs"))

from schemas import SCHEMAS  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def load_tokenizer(source: Optional[str]) -> Any:
    from vllm_engine.model_loader.tokenizer import get_tokenizer

    if source is None:
        from vllm_engine.model_loader.resolve import ensure_default_gguf

        source = str(ensure_default_gguf())
    return get_tokenizer(source)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos)
        self.setup_s = time.perf_counter() - t0
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def compile(self, schema: dict) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return self.xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                                       separators=(", ", ": ")))

    def fill(self, m: Any) -> None:
        m.fill_next_token_bitmask(self.bitmask, 0)

    def accept(self, m: Any, token: int) -> bool:
        return m.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos[0])
        self.setup_s = time.perf_counter() - t0
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
        self._fill = llguidance.torch.fill_next_token_bitmask

    def compile(self, schema: dict) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        m = self.ll.LLMatcher(self.tok, grammar)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def fill(self, m: Any) -> None:
        self._fill(m, self.bitmask, 0)

    def accept(self, m: Any, token: int) -> bool:
        return m.consume_token(token)


def measure(backend: Any, tokenizer: Any, schemas: list[tuple[str, dict, Any]], repeats: int) -> dict:
    compile_ms, first_mask_ms, mask_ms, rows = [], [], [], []
    for name, schema, instance in schemas:
        text = json.dumps(instance)  # the separators both grammars are compiled with
        tokens = tokenizer.encode(text, add_special_tokens=False)
        compiles, firsts = [], []  # every repeat counts: a server compiles each new schema once
        for _ in range(repeats):
            t0 = time.perf_counter()
            m = backend.compile(schema)
            t1 = time.perf_counter()
            backend.fill(m)
            t2 = time.perf_counter()
            compiles.append(t1 - t0)
            firsts.append(t2 - t0)
        per_token = []
        for _ in range(repeats):
            m = backend.compile(schema)
            for tok in tokens:
                t0 = time.perf_counter()
                backend.fill(m)
                per_token.append(time.perf_counter() - t0)
                if not backend.accept(m, tok):
                    raise AssertionError(f"{backend.name} rejected token {tok} of {name}'s instance {text}")
        compile_ms += [t * 1e3 for t in compiles]
        first_mask_ms += [t * 1e3 for t in firsts]
        mask_ms += [t * 1e3 for t in per_token]
        rows.append({"schema": name, "compile_ms": max(compiles) * 1e3, "compile_and_first_mask_ms": max(firsts) * 1e3,
                     "mask_ms_p50": statistics.median(per_token) * 1e3, "num_tokens": len(tokens)})
    return {"backend": backend.name, "tokenizer_setup_ms": backend.setup_s * 1e3,
            "compile_ms_p50": percentile(compile_ms, 50), "compile_ms_p99": percentile(compile_ms, 99),
            "compile_and_first_mask_ms_p50": percentile(first_mask_ms, 50),
            "compile_and_first_mask_ms_p99": percentile(first_mask_ms, 99),
            "mask_ms_p50": percentile(mask_ms, 50), "mask_ms_p99": percentile(mask_ms, 99),
            "num_masks": len(mask_ms), "schemas": rows}


BACKENDS: dict[str, Callable[..., Any]] = {"xgrammar": XGrammar, "llguidance": LLGuidance}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer source (default: the SmolLM2 GGUF's)")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--num-schemas", type=int, default=len(SCHEMAS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    vocab_size = len(tokenizer)
    eos = [tokenizer.eos_token_id]
    schemas = SCHEMAS[: args.num_schemas]
    results = []
    for name in args.backends:
        res = measure(BACKENDS[name](tokenizer, vocab_size, eos), tokenizer, schemas, args.repeats)
        results.append(res)
        print(f"{name:11s} tokenizer setup {res['tokenizer_setup_ms']:8.1f} ms | compile p50 "
              f"{res['compile_ms_p50']:7.2f} p99 {res['compile_ms_p99']:7.2f} ms | compile + first mask p50 "
              f"{res['compile_and_first_mask_ms_p50']:7.2f} p99 {res['compile_and_first_mask_ms_p99']:7.2f} ms | "
              f"mask p50 {res['mask_ms_p50'] * 1e3:7.1f} p99 {res['mask_ms_p99'] * 1e3:7.1f} us "
              f"({res['num_masks']} masks)")
    if args.out:
        Path(args.out).write_text(json.dumps({"vocab_size": vocab_size, "num_schemas": len(schemas),
                                              "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
