"""The host's own work per engine step, without the model: the real engine loop (async scheduling,
``schedule()``, the runner's input preparation and sampling arrays, stop checks, outputs) with the
model's forward, LM head and sampler replaced by stand-ins that cost nothing. What it reports is
what a GPU step has to hide: with async scheduling the host does this while the GPU runs the
previous step, so a step is host-bound when this exceeds the GPU's time for it.

    PYTHONPATH=. python tests/benchmarks/host_step.py --batch 256 --out results/host_step.json

The workload: ``--batch`` requests of ``--input-len`` prompt tokens, each decoding ``--output-len``
tokens (``ignore_eos``, temperature 0.6); the median of every phase over the decode steps at the
full batch, over ``--runs`` runs (the median run by host time).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import decode_step_medians, device_name, make_workload, print_table, write_json  # noqa: E402

from vllm_engine import Engine, SamplingParams  # noqa: E402
from vllm_engine.layers.sampler import SamplerOutput  # noqa: E402
from vllm_engine.utils import freeze_gc  # noqa: E402

BUNDLED = Path(__file__).resolve().parents[2] / "vllm_engine" / "model_configs"
PHASES = ("schedule_ms", "prepare_inputs_ms", "execute_ms", "update_and_output_ms", "host_ms")  # reported


class NullModel(torch.nn.Module):
    """The model's interface at no cost: hidden states and logits of zeros (the logits one row,
    broadcast: a [256, 151936] tensor per step would cost more than everything measured here)."""

    def __init__(self, hidden_size: int, vocab_size: int, device: torch.device) -> None:
        super().__init__()
        self.hidden_size, self.vocab_size, self.device = hidden_size, vocab_size, device

    def forward(self, input_ids, positions, kv_caches, attn_metadata, intermediate_tensors=None) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], self.hidden_size, device=self.device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, self.vocab_size, device=self.device).expand(hidden.shape[0], self.vocab_size)


class RandomSampler(torch.nn.Module):
    """Token ids drawn at random (the sampling arrays are still built and passed in)."""

    def __init__(self, vocab_size: int, seed: int, device: torch.device) -> None:
        super().__init__()
        self.vocab_size, self.gen = vocab_size, torch.Generator(device=device).manual_seed(seed)

    def forward(self, logits: torch.Tensor, meta) -> SamplerOutput:
        ids = torch.randint(3, self.vocab_size, (logits.shape[0],), generator=self.gen, device=logits.device)
        return SamplerOutput(ids, None)


class GcPauses:
    """The cycle collector's pauses while active (``gc.callbacks``): (generation, seconds) each."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._t0))

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        full = [d for g, d in self.pauses if g == 2]
        return {"gc_collections": len(self.pauses), "gc_full_collections": len(full),
                "gc_max_full_ms": max(full, default=0.0) * 1e3, "gc_total_ms": sum(d for _, d in self.pauses) * 1e3}


def tiny_model_dir(model: str, root: Path) -> Path:
    """The bundled config of ``model`` with two layers of width 64: the model is stubbed out, so only
    the vocabulary (the sampling arrays) and the block bookkeeping matter."""
    cfg = json.loads((BUNDLED / f"{model}.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32)
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(model=str(tiny_model_dir(args.model, Path(tmp))), load_format="dummy", dtype="float32",
                        max_model_len=args.input_len + args.output_len + 16, max_num_seqs=args.batch,
                        async_scheduling=True, enable_prefix_caching=args.enable_prefix_caching,
                        num_gpu_blocks_override=args.batch * ((args.input_len + args.output_len) // 16 + 2))
    vocab = engine.model_config.hf_config.vocab_size
    runner = engine.model_runner
    runner.model = NullModel(engine.model_config.hf_config.hidden_size, vocab, runner.device)
    runner.graph_runner = None  # CUDA graphs of the real model: not replayed
    runner.sampler = RandomSampler(vocab, args.seed, runner.device)
    w = make_workload("random", vocab, args.batch, args.input_len, args.output_len, args.seed)
    params = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True, detokenize=args.detokenize)
              for o in w.output_lens]
    engine.generate(w.prompts, params, use_tqdm=False)  # warm-up
    frozen = freeze_gc() if args.freeze_gc else 0
    runs = []
    for _ in range(args.runs):
        engine.scheduler.reset_prefix_cache()
        prof = engine.enable_step_profile()
        with GcPauses() as pauses:
            engine.generate(w.prompts, params, use_tqdm=False)
        runs.append({**decode_step_medians(prof, args.batch, args.batch),
                     "max_host_ms": max(r["host_ms"] for r in prof), **pauses.summary()})
    if frozen:
        gc.unfreeze()
    runs.sort(key=lambda r: r["host_ms"])
    return {"runs": runs, "median": runs[len(runs) // 2], "gc_frozen_objects": frozen}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="a bundled config name (its vocabulary is used)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--detokenize", action="store_true", help="needs the model's tokenizer (not bundled)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--freeze-gc", action="store_true", help="freeze the objects alive after the warm-up "
                   "(vllm_engine.utils.freeze_gc, as the server does)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = {"benchmark": "host_step", "args": vars(args), **run(args)}
    med = result["median"]
    print(f"host work per decode step on {device_name()}, {args.batch} running requests, {args.model} vocabulary "
          f"(median of {med['steps']} steps; the median of {args.runs} runs):")
    print_table([{"phase": k, "ms": round(med[k], 3)} for k in PHASES], ["phase", "ms"])
    for r in result["runs"]:
        print(f"run: slowest step's host work {r['max_host_ms']:.1f} ms; garbage collector: "
              f"{r['gc_collections']} runs, {r['gc_full_collections']} full, longest full {r['gc_max_full_ms']:.1f} ms, "
              f"{r['gc_total_ms']:.1f} ms in all")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
