"""The paged prefill attention kernel on a mixed step's prompt chunk: prompts of the nano workload's
lengths (uniform in [100, 1024]) filling ``--tokens`` query rows, their K/V in the paged cache in
shuffled blocks, timed for a grid of launch configs (queries per program, keys per loop step,
warps, pipeline stages) against PyTorch's SDPA over the same prompts (one causal call per prompt,
its K/V contiguous). Every config's output is checked against SDPA's. Prints TFLOPS (causal FLOPs:
4 * heads * head_dim * L(L+1)/2 per prompt) and writes JSON.

    PYTHONPATH=. python tests/benchmarks/prefill_attn_bench.py --model qwen3-0.6b --out prefill_attn.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import device_name, print_table, write_json  # noqa: E402

from vllm_engine.attention import triton_kernels as K  # noqa: E402
from vllm_engine.model_loader.resolve import resolve_model  # noqa: E402


def prompt_lens(tokens: int, seed: int) -> list[int]:
    """Nano-workload prompt lengths until ``tokens`` rows are filled (the last one cut to fit)."""
    rng = np.random.default_rng(seed)
    lens: list[int] = []
    while sum(lens) < tokens:
        lens.append(min(int(rng.integers(100, 1025)), tokens - sum(lens)))
    return lens


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", nargs="+", default=["qwen3-0.6b", "llama-3.1-8b"])
    p.add_argument("--tokens", type=int, default=8192, help="query rows (max_num_batched_tokens)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tiles", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from vllm_engine.layers.triton_linear import cuda_time_s

    dev, dt = torch.device("cuda"), torch.bfloat16
    lens = prompt_lens(args.tokens, seed=0)
    result = {"benchmark": "prefill_attn", "device": device_name(), "tokens": args.tokens, "prompt_lens": lens,
              "models": []}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for model in args.model:
        cfg = resolve_model(model, "dummy").hf_config
        heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        bs = args.block_size
        per_seq = [-(-n // bs) for n in lens]
        nblocks = sum(per_seq)
        width = -(-max(per_seq) // 16) * 16
        perm = torch.randperm(nblocks, generator=gen)
        bt = torch.zeros(len(lens), width, dtype=torch.int32)
        start = 0
        for i, nb in enumerate(per_seq):
            bt[i, :nb] = perm[start:start + nb]
            start += nb
        cache = torch.randn(2, nblocks, bs, kvh, d, dtype=dt, device=dev)
        bt = bt.to(dev)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        qsl = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=dev)
        q = torch.randn(sum(lens), heads, d, dtype=dt, device=dev)
        out = torch.empty_like(q)
        scale = d ** -0.5
        flops = sum(4 * heads * d * n * (n + 1) // 2 for n in lens)

        # SDPA reference: each prompt's K/V gathered out of the cache into contiguous tensors.
        qs, ks, vs = [], [], []
        for i, n in enumerate(lens):
            slots = bt[i, torch.arange(n, device=dev) // bs].long() * bs + torch.arange(n, device=dev) % bs
            kv = cache.view(2, nblocks * bs, kvh, d)[:, slots]  # [2, n, kvh, d]
            qs.append(q[qsl[i]:qsl[i + 1]].transpose(0, 1).unsqueeze(0))
            ks.append(kv[0].transpose(0, 1).unsqueeze(0).repeat_interleave(heads // kvh, dim=1).contiguous())
            vs.append(kv[1].transpose(0, 1).unsqueeze(0).repeat_interleave(heads // kvh, dim=1).contiguous())

        def sdpa():
            return [F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale) for a, b, c in zip(qs, ks, vs)]

        ref = torch.cat([o[0].transpose(0, 1) for o in sdpa()]).float()
        sdpa_s = cuda_time_s(sdpa, reps=args.reps, flush_bytes=0)
        rows = []
        for bm, tile, warps, stages in itertools.product(args.block_m, args.tiles, args.warps, args.stages):
            def run(bm=bm, tile=tile, warps=warps, stages=stages):
                K.paged_attention_prefill(q, cache, bt, seq_lens, qsl, out, len(lens), scale, None,
                                          skip_decodes=False, block_m=bm, tile_n=tile, num_warps=warps,
                                          num_stages=stages)
            try:
                out.zero_()
                run()
                torch.cuda.synchronize()
            except Exception as e:  # a config the compiler rejects (registers, shared memory)
                print(f"skip block_m {bm} tile {tile} w{warps} s{stages}: {type(e).__name__}")
                continue
            err = (out.float() - ref).abs().max().item()
            s = cuda_time_s(run, reps=args.reps, flush_bytes=0)
            rows.append({"block_m": bm, "tile": tile, "warps": warps, "stages": stages, "ms": round(s * 1e3, 3),
                         "tflops": round(flops / s / 1e12, 1), "max_abs_err": round(err, 4),
                         "today": int(bm == 128 and tile == 64 and warps == 8 and stages == 2)})
        rows.sort(key=lambda r: r["ms"])
        print(f"{model}: {len(lens)} prompts, {sum(lens)} tokens, heads {heads}/{kvh}, head_dim {d}; "
              f"SDPA {sdpa_s * 1e3:.3f} ms ({flops / sdpa_s / 1e12:.1f} TFLOPS)")
        print_table(rows[: args.top] + [r for r in rows[args.top:] if r["today"]],
                    ["block_m", "tile", "warps", "stages", "ms", "tflops", "max_abs_err", "today"])
        result["models"].append({"model": model, "heads": heads, "kv_heads": kvh, "head_dim": d, "flops": flops,
                                 "sdpa_ms": sdpa_s * 1e3, "configs": rows})
        del cache, qs, ks, vs
        torch.cuda.empty_cache()
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
