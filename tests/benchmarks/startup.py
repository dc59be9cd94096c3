"""Start-up time: ``Engine(model=...)`` until ready, in fresh processes, with its phases (config,
tokenizer, model and weights, memory profile, KV cache, CUDA graphs, warm-ups).

The first start runs with empty caches (Triton's compiled kernels, and the engine's own: the
linear-kernel choices; so every kernel compiles and every shape is timed); the second in a new
process with the caches the first one filled (what a restart on the same machine pays). Models
that need files from the engine's cache directory (a hub download, a GGUF's tokenizer) are not
supported here: use a local directory. Also
reported: how many variants of each Triton kernel the first start compiled.

    PYTHONPATH=. python tests/benchmarks/startup.py --model llama-3.1-8b --out results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from vllm_engine import Engine
imported = time.perf_counter() - t0
engine = Engine(**json.loads(sys.argv[1]))
print("STARTUP " + json.dumps(dict(engine.startup_seconds, imports=imported,
                                   process=time.perf_counter() - t0)), flush=True)
engine.shutdown()
"""


def one_start(engine_kwargs: dict, cache: str, timeout: float) -> dict:
    """Seconds per phase of one start in a new process (``process``: imports + start-up), with
    Triton's cache and ours (the linear-kernel choices) under ``cache``."""
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(cache, "triton"),
               VLLM_ENGINE_CACHE_DIR=os.path.join(cache, "vllm-engine"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(engine_kwargs)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [l for l in proc.stdout.splitlines() if l.startswith("STARTUP ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"start-up failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("STARTUP "):]), wall=wall)


def compiled_variants(triton_cache: str) -> dict[str, int]:
    """Kernel name -> variants compiled into ``triton_cache`` (one metadata JSON per variant),
    most first."""
    counts: dict[str, int] = {}
    for path in Path(triton_cache).glob("*/*.json"):
        if not path.name.startswith("__grp__"):
            counts[path.stem] = counts.get(path.stem, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--extra", default="{}", help="more Engine keyword arguments, as JSON")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--first-only", action="store_true",
                   help="only the first start (e.g. an older revision's, for an A/B)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    kwargs = dict(model=args.model, load_format=args.load_format, max_model_len=args.max_model_len,
                  **json.loads(args.extra))
    with tempfile.TemporaryDirectory(prefix="startup-cache-") as cache:
        first = one_start(kwargs, cache, args.timeout)
        variants = compiled_variants(os.path.join(cache, "triton"))
        second = {} if args.first_only else one_start(kwargs, cache, args.timeout)
    phases = sorted(set(first) | set(second), key=lambda k: -first.get(k, 0.0))
    rows = [{"phase": k, "first_s": first.get(k), "second_s": second.get(k)} for k in phases]
    print_table(rows, ["phase", "first_s", "second_s"])
    print(f"Triton variants compiled by the first start: {sum(variants.values())}:",
          ", ".join(f"{name} {n}" for name, n in variants.items()))
    write_json(args.out, {"benchmark": "startup", "args": vars(args), "first": first, "second": second,
                          "compiled_variants": variants})
    return 0


if __name__ == "__main__":
    sys.exit(main())
