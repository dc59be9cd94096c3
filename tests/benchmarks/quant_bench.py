"""Quantized models on a GPU (issue 19): each method against the same run's bf16 model, dummy weights at
a real model's shapes (``load_format="dummy"`` with ``quantization=``: docs/quantization.md).

* ``--part kernels``: every linear shape of the model at 1, 16, 64 and 256 rows: the bf16 product
  (the engine's linear picker) against each method's (W4A16 / W8A16 through the WNA16 picker, FP8
  ``_scaled_mm``, block FP8), times with the L2 flushed by a read, as the pickers time;
* ``--part latency``: batch-1 TPOT at ``--input-len`` context (tests/benchmarks/latency.py's loop), and
  each engine's weight bytes on the GPU and KV blocks.

    PYTHONPATH=. python tests/benchmarks/quant_bench.py --model llama-3.1-8b --part kernels latency \
        --methods none gptq awq compressed-tensors fp8 --out results/quant.json

Needs a CUDA GPU (prints why and exits 0 elsewhere; tests/quantization runs ``latency`` on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, make_workload, measure_bandwidth_gbs, print_table, write_json  # noqa: E402

ROWS = (1, 16, 64, 256)


def linear_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """(N, K) of a decoder layer's fused projections (one GPU)."""
    h, heads = hf_config.hidden_size, hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    hd = getattr(hf_config, "head_dim", None) or h // heads
    inter = hf_config.intermediate_size
    return {"qkv": ((heads + 2 * kv) * hd, h), "o": (h, heads * hd), "gate_up": (2 * inter, h), "down": (h, inter)}


def quantized_weights(n: int, k: int) -> dict:
    """Random weights of one [N, K] layer in each format: {method: (fn(x) -> y, bytes)}."""
    from vllm_engine.quantization.fp8 import fp8_linear, quantize_weight_per_channel
    from vllm_engine.quantization.kernels.fp8_block import fp8_block_linear
    from vllm_engine.quantization.kernels.wna16 import WNA16Weight
    from vllm_engine.quantization.kernels.wna16_picker import WNA16Picker
    from vllm_engine.quantization.utils import pack_int32

    dev = torch.device("cuda")
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    out = {}
    for bits in (4, 8):
        q = torch.randint(0, 1 << bits, (k, n), device=dev)
        scales = torch.rand(k // 128, n, device=dev, dtype=torch.bfloat16) * 0.01
        packed = WNA16Weight(pack_int32(q, bits, 0), scales, None, None, None, bits, 128)
        picker = WNA16Picker()
        out[f"w{bits}a16 g128"] = (lambda x, p=packed, pk=picker: pk(x, p), packed.qweight.numel() * 4)
    wq, ws = quantize_weight_per_channel(w)
    out["fp8 w8a8"] = (lambda x: fp8_linear(x, wq, ws, None, None, True), wq.numel())
    block_scales = torch.rand(n, k // 128, device=dev) * 1e-3
    out["fp8 block 128"] = (lambda x: fp8_block_linear(x, wq, block_scales, 128), wq.numel())
    from vllm_engine.layers.triton_linear import LinearPicker

    bf16_picker = LinearPicker()
    out["bf16"] = (lambda x: bf16_picker(x, w), w.numel() * 2)
    return out


def kernels(hf_config) -> list[dict]:
    from vllm_engine.layers.triton_linear import cuda_time_s

    rows = []
    for name, (n, k) in linear_shapes(hf_config).items():
        methods = quantized_weights(n, k)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            times = {}
            for method, (fn, nbytes) in methods.items():
                fn(x)  # the pickers decide here
                times[method] = cuda_time_s(lambda: fn(x), flush="read")
            for method, t in times.items():
                rows.append({"layer": name, "N": n, "K": k, "rows": m, "method": method, "us": round(t * 1e6, 2),
                             "x_bf16": round(times["bf16"] / t, 2), "weight_MB": round(methods[method][1] / 2**20, 1)})
    return rows


def latency(args) -> list[dict]:
    from latency import one_batch

    from vllm_engine import Engine
    from vllm_engine.utils import freeze_gc

    rows = []
    for method in args.methods:
        quantization = None if method == "none" else method
        engine = Engine(model=args.model, load_format="dummy", quantization=quantization, dtype=args.dtype,
                        max_model_len=args.max_model_len, max_num_seqs=1, enable_prefix_caching=False)
        model = engine.model_runner.model
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        cfg = engine.model_config.hf_config
        one_batch(engine, make_workload("random", cfg.vocab_size, 1, args.input_len, 8, 99).prompts, 8, "warm")
        freeze_gc()
        tpots = []
        for run in range(args.runs):
            w = make_workload("random", cfg.vocab_size, 1, args.input_len, args.output_len, seed=run)
            tpots += one_batch(engine, w.prompts, args.output_len, f"r{run}")[1]
        rows.append({"method": method, "tpot_ms_p50": round(statistics.median(tpots) * 1e3, 3),
                     "weight_bytes": weight_bytes, "weights_GB": round(weight_bytes / 1e9, 3),
                     "kv_blocks": engine.num_gpu_blocks})
        engine.shutdown()
        del engine, model
        gc.collect()
        torch.cuda.empty_cache()
    base = next((r["tpot_ms_p50"] for r in rows if r["method"] == "none"), None)
    for r in rows:
        r["speedup"] = round(base / r["tpot_ms_p50"], 2) if base else None
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--part", nargs="+", choices=["kernels", "latency"], default=["kernels", "latency"])
    p.add_argument("--methods", nargs="+", default=["none", "gptq", "fp8"],
                   help="for --part latency: none (bf16) or a quantization method")
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("quant_bench.py needs a CUDA GPU; nothing measured.")
        return 0
    from vllm_engine.config import EngineArgs

    hf_config = EngineArgs(model=args.model, load_format="dummy").create_engine_config().model.hf_config
    result = {"benchmark": "quantization", "args": vars(args), "bandwidth_gbs": measure_bandwidth_gbs()}
    if "kernels" in args.part:
        result["kernels"] = kernels(hf_config)
        print_table(result["kernels"], ["layer", "N", "K", "rows", "method", "us", "x_bf16", "weight_MB"])
    if "latency" in args.part:
        result["latency"] = latency(args)
        print_table(result["latency"], ["method", "tpot_ms_p50", "speedup", "weights_GB", "kv_blocks"])
    print(f"device: {device_name()}, model {args.model}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
