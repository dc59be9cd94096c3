"""Perplexity of one model under each quantization method, on a fixed text (issue 19's quality check):
by default the SmolLM2-135M Q4_1 GGUF dequantized at load (the float model), kept quantized
(``gguf``), and its dequantized weights quantized to FP8 at load (``fp8``).

    PYTHONPATH=. python tests/benchmarks/quant_perplexity.py --methods none gguf fp8 --out results/ppl.json

Runs on the CPU (float32, a few minutes) or a GPU (``--device cuda --dtype bfloat16``). The text is a
public-domain passage kept here so that runs compare across sessions.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_json  # noqa: E402

TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands "
    "which have connected them with another, and to assume among the powers of the earth, the separate and equal "
    "station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of "
    "mankind requires that they should declare the causes which impel them to the separation. We hold these "
    "truths to be self-evident, that all men are created equal, that they are endowed by their Creator with "
    "certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. That to secure "
    "these rights, Governments are instituted among Men, deriving their just powers from the consent of the "
    "governed, That whenever any Form of Government becomes destructive of these ends, it is the Right of the "
    "People to alter or to abolish it, and to institute new Government, laying its foundation on such "
    "principles and organizing its powers in such form, as to them shall seem most likely to effect their "
    "Safety and Happiness. Prudence, indeed, will dictate that Governments long established should not be "
    "changed for light and transient causes; and accordingly all experience hath shewn, that mankind are more "
    "disposed to suffer, while evils are sufferable, than to right themselves by abolishing the forms to which "
    "they are accustomed. But when a long train of abuses and usurpations, pursuing invariably the same Object "
    "evinces a design to reduce them under absolute Despotism, it is their right, it is their duty, to throw off "
    "such Government, and to provide new Guards for their future security."
)


def perplexity(engine, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood of tokens 1..n given the ones before), from the prompt logprobs."""
    from vllm_engine import SamplingParams

    out = engine.generate([token_ids], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)[0]
    nll = [-out.prompt_logprobs[i][t].logprob for i, t in enumerate(token_ids) if i > 0]
    return math.exp(sum(nll) / len(nll))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the SmolLM2-135M Q4_1 GGUF (fetched once)")
    p.add_argument("--methods", nargs="+", default=["none", "gguf", "fp8"],
                   help="none (the checkpoint as loaded by default) or a quantization method")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-tokens", type=int, default=512, help="the text's first tokens")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from vllm_engine import Engine

    model = args.model
    if model is None:
        from vllm_engine.model_loader.resolve import ensure_default_gguf

        model = str(ensure_default_gguf())
    rows = []
    for method in args.methods:
        engine = Engine(model=model, quantization=None if method == "none" else method, device=args.device,
                        dtype=args.dtype, max_model_len=args.max_tokens + 8, enable_prefix_caching=False)
        ids = engine.tokenize(TEXT)[: args.max_tokens]
        rows.append({"method": method, "tokens": len(ids), "perplexity": round(perplexity(engine, ids), 4)})
        engine.shutdown()
    base = next((r["perplexity"] for r in rows if r["method"] == "none"), None)
    for r in rows:
        r["vs_none"] = round(r["perplexity"] / base, 4) if base else None
    print_table(rows, ["method", "tokens", "perplexity", "vs_none"])
    write_json(args.out, {"benchmark": "quant_perplexity", "model": model, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
