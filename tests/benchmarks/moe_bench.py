"""The fused-MoE Triton path against a per-expert loop of cuBLAS GEMMs, at decode batch sizes, for the
experts of a bundled MoE config (one layer's experts per call; ``--layers`` copies of them so that each
call reads its weights from HBM, as a step does). Both are timed inside a CUDA graph; the loop's
token lists are computed on the host beforehand (a real loop would also pay that sync). The floor is
the bytes of the experts the batch touches over the measured bandwidth. Issue 20's goal: the fused
path at least 2x the loop at decode batch sizes.

    PYTHONPATH=. python tests/benchmarks/moe_bench.py --model qwen3-30b-a3b --batch-sizes 1 4 16 64 --out r.json

On a machine without a GPU ``--smoke`` runs each path once at a reduced shape (under
TRITON_INTERPRET=1) and checks that they agree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import device_name, graph_time_s, measure_bandwidth_gbs, print_table, write_json  # noqa: E402

from vllm_engine.layers import fused_moe as M  # noqa: E402
from vllm_engine.model_loader.resolve import resolve_model  # noqa: E402


def expert_shape(cfg) -> tuple[int, int, int, int]:
    """(num_experts, top_k, hidden, expert intermediate size) of a Mixtral / Qwen-MoE config."""
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return experts, cfg.num_experts_per_tok, cfg.hidden_size, inter


def per_expert_loop(x, w13, w2, weights, ids):
    """A callable running the cuBLAS loop over the experts ``ids`` touches (token lists fixed here)."""
    inter = w2.shape[2]
    plan = []
    for e in torch.unique(ids).tolist():
        token, slot = torch.where(ids == e)
        plan.append((e, token, weights[token, slot, None].to(x.dtype)))
    out = torch.zeros_like(x)

    def run():
        out.zero_()
        for e, token, w in plan:
            gate_up = F.linear(x[token], w13[e])
            y = F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2[e]) * w
            out.index_add_(0, token, y)
        return out

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--layers", type=int, default=8, help="copies of the experts, cycled (HBM reads)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="CPU: one call of each path at a reduced shape")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    experts, top_k, hidden, inter = expert_shape(resolve_model(args.model, "dummy").hf_config)
    if args.smoke:
        hidden, inter, args.layers = 64, 32, 1
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    w13 = [torch.randn(experts, 2 * inter, hidden, device=dev, dtype=dt) * hidden ** -0.5 for _ in range(args.layers)]
    w2 = [torch.randn(experts, hidden, inter, device=dev, dtype=dt) * inter ** -0.5 for _ in range(args.layers)]
    bw = measure_bandwidth_gbs()
    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, hidden, device=dev, dtype=dt)
        weights, ids = M.select_experts(torch.randn(batch, experts, device=dev), top_k, renormalize=True)
        loops = [per_expert_loop(x, a, b, weights, ids) for a, b in zip(w13, w2)]
        fused = [lambda a=a, b=b: M.triton_fused_moe(x, a, b, weights, ids) for a, b in zip(w13, w2)]
        touched = len(torch.unique(ids))
        row = {"batch": batch, "experts_touched": touched}
        if args.smoke:
            diff = (fused[0]().float() - loops[0]().float()).abs().max().item()
            row["max_abs_diff"] = diff
            assert diff < (1e-3 if dt == torch.float32 else 2e-2), diff  # bf16 on the GPU: a few ulps
        else:
            t_fused = graph_time_s(lambda: [f() for f in fused], args.reps) / args.layers * 1e6
            t_loop = graph_time_s(lambda: [f() for f in loops], args.reps) / args.layers * 1e6
            floor = touched * 3 * hidden * inter * 2 / (bw * 1e3) if bw else float("nan")
            row.update(fused_us=t_fused, loop_us=t_loop, speedup=t_loop / t_fused, floor_us=floor,
                       pct_of_floor=100 * floor / t_fused)
        rows.append(row)
    cols = ["batch", "experts_touched"] + (["max_abs_diff"] if args.smoke else
                                           ["fused_us", "loop_us", "speedup", "floor_us", "pct_of_floor"])
    print(f"{args.model} experts: {experts} x ({hidden} -> {inter}), top-{top_k}, {device_name()}")
    print_table(rows, cols)
    write_json(args.out, {"benchmark": "fused_moe", "model": args.model, "bandwidth_gbs": bw, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
