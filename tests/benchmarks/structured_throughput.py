"""Structured outputs at full batch: throughput with every request under a JSON schema against the
same workload unconstrained, the per-token mask time, grammar compile times, and TTFT with a new
schema against a cached one (issue 22's targets: constrained >= 90% of unconstrained at batch 64).

    PYTHONPATH=. python tests/benchmarks/structured_throughput.py --num-prompts 64 --max-num-seqs 64 \
        --out results/structured_throughput.json

The grammar needs a tokenizer: by default the model is the SmolLM2 GGUF (real weights); with dummy
weights of a bundled config (``--model qwen3-0.6b --load-format dummy``, the nano rows of
docs/benchmarks.md) the SmolLM2 vocabulary is borrowed. Requests ignore EOS and run to their
workload length; the schema's free-text field keeps a grammar open for the whole reply, so every
step of every request is masked. A GPU measurement: on a CPU pass tiny settings to try it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "structured_outputs"))

from common import device_name, make_workload, percentiles, sync, write_json  # noqa: E402
from schemas import SCHEMAS  # noqa: E402

from vllm_engine import Engine, SamplingParams, StructuredOutputsParams  # noqa: E402

# An object whose string field the grammar never forces to close: the mask stays in play every step.
OPEN_SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}, "text": {"type": "string"}},
               "required": ["id", "text"], "additionalProperties": False}


def run(engine: Engine, workload, schema: dict | None, temperature: float) -> dict:
    engine.scheduler.reset_prefix_cache()
    so = StructuredOutputsParams(json=schema) if schema is not None else None
    params = [SamplingParams(temperature=temperature, max_tokens=o, ignore_eos=True, detokenize=False,
                             structured_outputs=so) for o in workload.output_lens]
    grammars = engine.model_runner.grammars if engine.model_runner is not None else None
    if grammars is not None:
        grammars.fill_seconds = []
    sync()
    t0 = time.perf_counter()
    outs = engine.generate(workload.prompts, params, use_tqdm=False)
    sync()
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    row = {"constrained": schema is not None, "seconds": elapsed, "output_tokens": tokens,
           "output_tok_s": tokens / elapsed}
    if grammars is not None and grammars.fill_seconds:
        per_token_us = [s / n * 1e6 for n, s in grammars.fill_seconds]
        per_step_ms = [s * 1e3 for _, s in grammars.fill_seconds]
        row["mask_us_per_token"] = percentiles(per_token_us, (50, 99))
        row["mask_ms_per_step"] = percentiles(per_step_ms, (50, 99))
        grammars.fill_seconds = None
    return row


def ttft(engine: Engine, prompt: list[int], schema: dict) -> float:
    """Seconds from add_request to the first token of one request under ``schema``."""
    rid = f"ttft-{uuid.uuid4().hex[:8]}"
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, detokenize=False,
                            structured_outputs=StructuredOutputsParams(json=schema))
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.outputs[0].token_ids:
                first = time.perf_counter() - t0
                while engine.has_unfinished_requests():
                    engine.step()
                return first


def compile_times(engine: Engine) -> dict:
    """Cold compiles of the 30 test schemas on a fresh manager (no cache), in ms."""
    from vllm_engine.structured_output import StructuredOutputManager

    manager = StructuredOutputManager(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
    manager.compile(StructuredOutputsParams(json={"type": "integer"}))  # the compile threads warmed up
    times = []
    for _, schema, _ in SCHEMAS:
        t0 = time.perf_counter()
        manager.compile(StructuredOutputsParams(json=schema))
        times.append((time.perf_counter() - t0) * 1e3)
    manager.shutdown()
    return percentiles(times, (50, 99))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the SmolLM2-135M-Instruct GGUF")
    p.add_argument("--load-format", default="auto", help="dummy: random weights (e.g. --model qwen3-0.6b)")
    p.add_argument("--tokenizer", default=None, help="the grammar's vocabulary (default: the model's, else the "
                                                     "SmolLM2 GGUF's; a smaller vocabulary than the model's "
                                                     "leaves the ids above it masked)")
    p.add_argument("--dataset", choices=["nano", "random"], default="nano")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--runs", type=int, default=2, help="timed runs of each mode after a warm-up (median kept)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from vllm_engine.model_loader.resolve import ensure_default_gguf

    if args.model is None:
        args.model = str(ensure_default_gguf())
    engine = Engine(model=args.model, load_format=args.load_format, tokenizer=args.tokenizer,
                    max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    if engine.tokenizer is None:  # dummy weights of a bundled config: borrow SmolLM2's vocabulary
        engine.shutdown()
        engine = Engine(model=args.model, load_format=args.load_format, tokenizer=str(ensure_default_gguf()),
                        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    workload = make_workload(args.dataset, engine.model_config.vocab_size, args.num_prompts, args.input_len,
                             args.output_len)
    result = {"device": device_name(), "model": args.model, "load_format": args.load_format,
              "num_prompts": args.num_prompts,
              "max_num_seqs": args.max_num_seqs, "dataset": args.dataset, "schema": OPEN_SCHEMA, "rows": []}
    run(engine, workload, None, args.temperature)  # warm-up (both paths compile their kernels)
    run(engine, workload, OPEN_SCHEMA, args.temperature)
    for schema in (None, OPEN_SCHEMA):
        rows = [run(engine, workload, schema, args.temperature) for _ in range(args.runs)]
        best = sorted(rows, key=lambda r: r["output_tok_s"])[len(rows) // 2]
        result["rows"].append(best)
        print(f"constrained={best['constrained']}: {best['output_tok_s']:.0f} output tok/s"
              + (f", mask {best['mask_us_per_token']} us/token" if "mask_us_per_token" in best else ""))
    plain, constrained = result["rows"]
    result["constrained_over_unconstrained"] = constrained["output_tok_s"] / plain["output_tok_s"]
    result["compile_ms"] = compile_times(engine)
    prompt = workload.prompts[0][:64]
    fresh = dict(OPEN_SCHEMA, properties={**OPEN_SCHEMA["properties"], f"k{uuid.uuid4().hex[:6]}": {"type": "integer"}})
    result["ttft_new_schema_ms"] = ttft(engine, prompt, fresh) * 1e3
    result["ttft_cached_schema_ms"] = statistics.median(ttft(engine, prompt, fresh) * 1e3 for _ in range(3))
    print(f"constrained / unconstrained = {result['constrained_over_unconstrained']:.3f}; "
          f"compile {result['compile_ms']} ms; TTFT new schema {result['ttft_new_schema_ms']:.1f} ms, "
          f"cached {result['ttft_cached_schema_ms']:.1f} ms")
    write_json(args.out, result)
    engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
