"""Speculative decoding at batch 1 on an input-grounded workload (tests/benchmarks/spec_prompts.json:
edits and rewrites that copy a passage or code from the prompt): TPOT with n-gram lookup at each k
against speculation off, the acceptance metrics, and whether the greedy tokens are the same.

    PYTHONPATH=. python tests/benchmarks/spec_decode_bench.py --num-speculative-tokens 2 4 \
        --prompt-lookup-min 2 --prompt-lookup-max 4 --output-len 256 --out results/spec_decode.json

Default model: SmolLM2-135M-Instruct (the bundled GGUF). Each prompt runs alone (chat template when
the tokenizer has one, greedy, up to --output-len tokens or EOS); a request's TPOT is (time of its
last token - time of its first) / (tokens - 1); the row reports the median over the prompts.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, print_table, write_json  # noqa: E402

from vllm_engine import Engine, SamplingParams  # noqa: E402

PROMPTS_FILE = Path(__file__).resolve().parent / "spec_prompts.json"


def run_one(engine: Engine, prompt: dict, output_len: int, tag: str) -> tuple[list[int], float]:
    """One request alone to completion: (its tokens, its TPOT in seconds; NaN under 2 tokens)."""
    engine.add_request(tag, prompt, SamplingParams(temperature=0.0, max_tokens=output_len, detokenize=False))
    first = last = None
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            now = time.perf_counter()
            if o.outputs[0].token_ids:
                first = first if first is not None else now
                last = now
                tokens = o.outputs[0].token_ids
    n = len(tokens)
    return tokens, ((last - first) / (n - 1)) if n > 1 else float("nan")


def encode(engine: Engine, text: str) -> dict:
    tok = engine.tokenizer
    if tok is not None and getattr(tok, "chat_template", None):
        rendered = engine.apply_chat_template([{"role": "user", "content": text}])
        return {"prompt_token_ids": engine.tokenize(rendered, add_special_tokens=False)}
    return {"prompt_token_ids": engine.tokenize(text)}


def run_config(args, spec: dict | None, texts: list[str]) -> dict:
    engine = Engine(model=args.model, load_format=args.load_format, dtype=args.dtype,
                    max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                    speculative_config=spec)
    prompts = [encode(engine, t) for t in texts]
    run_one(engine, prompts[0], 8, "warmup")  # compiles, graphs, allocator
    outputs, tpots = [], []
    for i, p in enumerate(prompts):
        tokens, tpot = run_one(engine, p, args.output_len, f"p{i}")
        outputs.append(tokens)
        tpots.append(tpot)
    stats = engine.get_stats().spec_decode
    row = {"k": spec["num_speculative_tokens"] if spec else 0,
           "tpot_ms_p50": 1e3 * statistics.median(t for t in tpots if t == t),
           "tpot_ms_mean": 1e3 * statistics.fmean(t for t in tpots if t == t),
           "output_tokens": sum(len(o) for o in outputs), "outputs": outputs}
    if stats is not None:
        row.update(acceptance_rate=stats.acceptance_rate, mean_acceptance_length=stats.mean_acceptance_length,
                   num_drafts=stats.num_drafts, accepted_per_position=list(stats.accepted_per_position),
                   per_position_acceptance=[a / stats.num_drafts if stats.num_drafts else 0.0
                                            for a in stats.accepted_per_position])
    engine.shutdown()
    del engine
    gc.collect()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", default=str(PROMPTS_FILE))
    p.add_argument("--num-prompts", type=int, default=None, help="the first N prompts of the file")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-speculative-tokens", type=int, nargs="+", default=[2, 4])
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    texts = json.loads(Path(args.prompts).read_text())["prompts"][: args.num_prompts]

    rows = [run_config(args, None, texts)]
    for k in args.num_speculative_tokens:
        spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": args.prompt_lookup_min,
                "prompt_lookup_max": args.prompt_lookup_max}
        rows.append(run_config(args, spec, texts))
    base = rows[0]
    for r in rows:
        r["tpot_speedup"] = base["tpot_ms_p50"] / r["tpot_ms_p50"]
        r["same_tokens_as_off"] = r["outputs"] == base["outputs"]
    print_table([{k: v for k, v in r.items() if k not in ("outputs", "accepted_per_position")} for r in rows],
                ["k", "tpot_ms_p50", "tpot_speedup", "acceptance_rate", "mean_acceptance_length",
                 "same_tokens_as_off"])
    for r in rows:
        del r["outputs"]
    write_json(args.out, {"device": device_name(), "model": args.model, "output_len": args.output_len,
                          "num_prompts": len(texts), "prompt_lookup": [args.prompt_lookup_min, args.prompt_lookup_max],
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
