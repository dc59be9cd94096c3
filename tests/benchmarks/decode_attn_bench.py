"""The paged decode attention kernel at small batches, timed as a decode step runs it: one call per
layer inside a CUDA graph, each layer on its own KV cache (so the K/V reads come from HBM), for a
grid of launch configs (splits, keys per tile, warps, pipeline stages, V loaded before or after the
q.k dot). Prints microseconds per layer (decode kernel + split reduce) next to the KV-read floor
(KV bytes / measured bandwidth) and the config the backend picks today, and writes JSON.

    PYTHONPATH=. python tests/benchmarks/decode_attn_bench.py --model llama-3.1-8b --context 1000 --batch-sizes 1 4
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import device_name, graph_time_s, measure_bandwidth_gbs, print_table, write_json  # noqa: E402

from vllm_engine.attention import triton_kernels as K  # noqa: E402
from vllm_engine.attention.triton_attn import TritonAttentionBackend  # noqa: E402
from vllm_engine.model_loader.resolve import resolve_model  # noqa: E402


def graph_us_per_layer(calls, reps: int) -> float:
    """Median microseconds per call of a CUDA graph that runs ``calls`` (one per layer) in order."""

    def run_all() -> None:
        for c in calls:
            c()

    return graph_time_s(run_all, reps) / len(calls) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--max-model-len", type=int, default=4096, help="for the backend's own split plan")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--splits", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--tiles", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = resolve_model(args.model, "dummy").hf_config
    heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = measure_bandwidth_gbs()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    backend = TritonAttentionBackend()
    result = {"benchmark": "decode_attn", "model": args.model, "context": args.context, "device": device_name(),
              "bandwidth_gbs": bw, "rows": []}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for bs in args.batch_sizes:
        per_seq = -(-args.context // args.block_size)
        nblocks = bs * per_seq
        caches = [torch.randn(2, nblocks, args.block_size, kvh, d, dtype=dt, device=dev) for _ in range(args.layers)]
        bt = torch.randperm(nblocks, generator=gen).view(bs, per_seq).to(torch.int32).to(dev)
        seq_lens = torch.full((bs,), args.context, dtype=torch.int32, device=dev)
        qsl = torch.arange(bs + 1, dtype=torch.int32, device=dev)
        order = torch.arange(bs, dtype=torch.int32, device=dev)
        q = torch.randn(bs, heads, d, dtype=dt, device=dev)
        out = torch.empty_like(q)
        floor_us = bs * args.context * kvh * d * 2 * 2 / (bw * 1e9) * 1e6 if bw else None
        today = backend.decode_splits(bs, kvh, args.max_model_len, dev)

        def run(splits, tile, warps, stages, early_v):
            calls = [lambda c=c: K.paged_attention_decode(
                q, c, bt, seq_lens, qsl, out, bs, d ** -0.5, None, num_splits=splits, mixed=True, tile_n=tile,
                num_warps=warps, seq_order=order, num_stages=stages, early_v=early_v) for c in caches]
            return graph_us_per_layer(calls, args.reps)

        rows = []
        for splits, tile, warps, stages, early_v in itertools.product(args.splits, args.tiles, args.warps,
                                                                      args.stages, (False, True)):
            try:
                us = run(splits, tile, warps, stages, early_v)
            except Exception as e:  # a config the compiler rejects (registers, shared memory)
                print(f"skip splits {splits} tile {tile} w{warps} s{stages} ev{int(early_v)}: {type(e).__name__}")
                continue
            rows.append({"batch": bs, "splits": splits, "tile": tile, "warps": warps, "stages": stages,
                         "early_v": int(early_v), "us_per_layer": round(us, 2),
                         "today": int(splits == today and tile == 64 and warps == 4 and stages == 3 and not early_v)})
        rows.sort(key=lambda r: r["us_per_layer"])
        base = [r for r in rows if r["today"]]
        print(f"batch {bs}, context {args.context}: KV floor {floor_us:.2f} us/layer; today's config "
              f"(splits {today}, tile 64, w4 s3): {base[0]['us_per_layer'] if base else 'n/a'} us; "
              f"{len(rows)} configs, SMs {sms}")
        print_table(rows[: args.top], ["splits", "tile", "warps", "stages", "early_v", "us_per_layer", "today"])
        result["rows"].append({"batch": bs, "floor_us": floor_us, "today_splits": today, "configs": rows})
        del caches
        torch.cuda.empty_cache()
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
