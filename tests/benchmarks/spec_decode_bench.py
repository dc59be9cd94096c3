"""Speculative decoding at batch 1 on an input-grounded workload (tests/benchmarks/spec_prompts.json:
edits and rewrites that copy a passage or code from the prompt): TPOT with n-gram lookup at each k
against speculation off, the acceptance metrics, and whether the greedy tokens are the same.

    PYTHONPATH=. python tests/benchmarks/spec_decode_bench.py --num-speculative-tokens 2 4 \
        --prompt-lookup-min 2 --prompt-lookup-max 4 --output-len 256 --out results/spec_decode.json

Default model: SmolLM2-135M-Instruct (the bundled GGUF). Each prompt runs alone (chat template when
the tokenizer has one, greedy, up to --output-len tokens or EOS); a request's TPOT is (time of its
last token - time of its first) / (tokens - 1); the row reports the median over the prompts. Each row also has the median phases of the steps that verified proposals and of
the plain decode steps (``verify_step`` / ``plain_step``: the engine's step profile, and on CUDA the
GPU time of each from its start to its last launched work).

With --draft-model, a draft model proposes instead (speculative_config {"model": DRAFT}), and
--acceptance forces the acceptance rate (spec_verify_cost.forced_acceptance: every proposal is
verified, then kept with probability a until the first rejection): the study of a draft at real
shapes with dummy weights, where the draft's proposals would otherwise never be accepted. Random
prompts of --input-len tokens, --batch-sizes requests at once; each row: TPOT against the target
alone, the speed-up, and the engine's mean acceptance length next to (1 - a^(k+1)) / (1 - a):

    PYTHONPATH=. python tests/benchmarks/spec_decode_bench.py --model llama-3.1-8b --draft-model llama-3.2-1b \
        --load-format dummy --num-speculative-tokens 2 4 --acceptance 0.5 0.7 0.9 --batch-sizes 1 \
        --input-len 512 --output-len 128 --out results/spec_decode_draft_8b_1b.json

The same with an EAGLE-1 head of the 8B's shapes (bundled config eagle-llama-3.1-8b): --draft-model
eagle-llama-3.1-8b (the name says EAGLE; --draft-method eagle for a path that does not).
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

from common import device_name, print_table, step_costs, write_json  # noqa: E402

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
    profile = engine.enable_step_profile()
    runner = engine.model_runner
    if runner is not None and runner.device.type == "cuda":
        runner.gpu_timeline = []
    outputs, tpots = [], []
    for i, p in enumerate(prompts):
        tokens, tpot = run_one(engine, p, args.output_len, f"p{i}")
        outputs.append(tokens)
        tpots.append(tpot)
    stats = engine.get_stats().spec_decode
    row = {"k": spec["num_speculative_tokens"] if spec else 0,
           "tpot_ms_p50": 1e3 * statistics.median(t for t in tpots if t == t),
           "tpot_ms_mean": 1e3 * statistics.fmean(t for t in tpots if t == t),
           "output_tokens": sum(len(o) for o in outputs), "outputs": outputs,
           **step_costs(profile, runner.gpu_timeline if runner is not None else None)}
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
    p.add_argument("--draft-model", default=None, help="a draft model proposes (with --acceptance: forced)")
    p.add_argument("--draft-method", default=None, choices=["draft_model", "eagle"],
                   help="what --draft-model is (default: from its name, as vLLM: 'eagle' in it means an EAGLE head)")
    p.add_argument("--acceptance", type=float, nargs="+", default=[0.5, 0.7, 0.9],
                   help="forced acceptance rates (--draft-model only)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="--draft-model only")
    p.add_argument("--input-len", type=int, default=512, help="random prompts' length (--draft-model only)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.draft_model is not None:
        return draft_model_study(args)
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
    for r in rows:  # the step costs in the table: the verifying step's and the plain one's
        for name in ("verify_step", "plain_step"):
            r[name + "_ms"] = r[name].get("total_ms")
            r[name + "_gpu_ms"] = r[name].get("gpu_ms")
    print_table([{k: v for k, v in r.items() if k not in ("outputs", "accepted_per_position")} for r in rows],
                ["k", "tpot_ms_p50", "tpot_speedup", "acceptance_rate", "mean_acceptance_length",
                 "same_tokens_as_off", "verify_step_ms", "verify_step_gpu_ms", "plain_step_ms", "plain_step_gpu_ms"])
    for r in rows:
        del r["outputs"]
    write_json(args.out, {"device": device_name(), "model": args.model, "output_len": args.output_len,
                          "num_prompts": len(texts), "prompt_lookup": [args.prompt_lookup_min, args.prompt_lookup_max],
                          "rows": rows})
    return 0


def draft_model_study(args) -> int:
    """TPOT with a draft model at each k and forced acceptance rate, against the target alone."""
    from spec_verify_cost import forced_acceptance, measure

    def engine_for(k: int | None) -> Engine:
        spec = None if k is None else {"model": args.draft_model, "num_speculative_tokens": k, "adaptive": False}
        if spec is not None and args.draft_method:
            spec["method"] = args.draft_method
        return Engine(model=args.model, load_format=args.load_format, dtype=args.dtype,
                      max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, speculative_config=spec)

    engine = engine_for(None)
    vocab = engine.model_config.vocab_size
    measure(engine, 1, args.input_len, 8, vocab, "warm")
    base = {b: measure(engine, b, args.input_len, args.output_len, vocab, f"off{b}") for b in args.batch_sizes}
    rows = [{"k": 0, "acceptance": None, "batch": b, "tpot_ms": 1e3 * base[b], "tpot_speedup": 1.0}
            for b in args.batch_sizes]
    engine.shutdown()
    del engine
    gc.collect()
    for k in args.num_speculative_tokens:
        engine = engine_for(k)
        measure(engine, 1, args.input_len, 8, vocab, "warm")
        for alpha in args.acceptance:
            for b in args.batch_sizes:
                before = engine.get_stats().spec_decode
                costs: dict = {}
                with forced_acceptance(alpha):
                    tpot = measure(engine, b, args.input_len, args.output_len, vocab, f"k{k}a{alpha}b{b}", costs)
                after = engine.get_stats().spec_decode
                drafts = after.num_drafts - before.num_drafts
                accepted = after.num_accepted_tokens - before.num_accepted_tokens
                rows.append({"k": k, "acceptance": alpha, "batch": b, "tpot_ms": 1e3 * tpot,
                             "tpot_speedup": base[b] / tpot,
                             "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
                             "expected_acceptance_length": sum(alpha ** i for i in range(k + 1)),
                             "verify_step_ms": costs["verify_step"].get("total_ms"),
                             "verify_step_gpu_ms": costs["verify_step"].get("gpu_ms"), **costs})
        engine.shutdown()
        del engine
        gc.collect()
    print_table(rows, ["k", "acceptance", "batch", "tpot_ms", "tpot_speedup", "mean_acceptance_length",
                       "expected_acceptance_length", "verify_step_ms", "verify_step_gpu_ms"])
    write_json(args.out, {"device": device_name(), "model": args.model, "draft_model": args.draft_model,
                          "draft_method": args.draft_method,
                          "load_format": args.load_format, "input_len": args.input_len,
                          "output_len": args.output_len, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
