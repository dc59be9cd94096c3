"""Mixture-of-experts feed-forward: top-k routing and the experts' SwiGLU MLPs, one grouped GEMM per
projection for all experts (Mixtral, Qwen2-MoE, Qwen3-MoE).

``FusedMoE`` holds every expert's weights stacked: ``w13_weight [E, 2 * I_r, H]`` (gate | up rows of
each expert) and ``w2_weight [E, H, I_r]``, where ``I_r`` is this rank's share of the intermediate
size: tensor parallelism splits each expert like the dense MLP (gate/up rows, down columns), and the
ranks' partial outputs are summed by one all-reduce (``reduce_results``, or by the caller).

The computation, for tokens x [T, H] routed to experts ``topk_ids [T, k]`` with weights
``topk_weights [T, k]``:

1. ``align_by_expert``: the T * k (token, slot) pairs sorted by expert, each expert's run padded to
   a multiple of BLOCK_M, so every BLOCK_M tile of the sorted list belongs to one expert. Torch ops
   on the device, no host sync: the grid is sized for the worst case and surplus tiles exit.
2. ``_fused_moe_kernel`` (one launch): each tile gathers its tokens' rows of x and multiplies them by
   its expert's w13 -> [T * k, 2 I_r]; SiLU-and-mul -> [T * k, I_r].
3. The same kernel with w2, each row multiplied by its top-k weight in the kernel -> [T * k, H], then
   summed over the k slots -> [T, H].

Triton for CUDA tensors (and the tests, under the interpreter); ``torch_fused_moe`` (a loop over the
experts that got tokens) elsewhere.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vllm_engine import envs
from vllm_engine.distributed import get_tp_group
from vllm_engine.distributed.utils import divide
from vllm_engine.layers import pdl
from vllm_engine.layers.parallel_compile import launch
from vllm_engine.layers.utils import check_shape, set_weight_attrs

try:
    import triton
    import triton.language as tl

    from vllm_engine.layers.pdl import pdl_prologue
except ImportError:  # CPU-only installs: the torch path serves every call
    triton = None


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (float32), the top ``top_k``; ``renormalize``: the k weights divided by
    their sum (Mixtral; Qwen's ``norm_topk_prob``). Returns (weights float32 [T, k], ids int64 [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_top_k(router_logits: torch.Tensor, top_k: int, num_groups: int, top_groups: int, scoring: str,
                  correction_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's group-limited routing on float32 scores (softmax, or sigmoid for V3): the experts
    are ``num_groups`` equal groups; a group scores its best expert (softmax) or the sum of its two
    best (sigmoid, after adding ``correction_bias``); only the ``top_groups`` best groups compete for
    the token's ``top_k`` experts. The weights are the scores themselves (without the bias).
    Returns (weights float32 [T, k], ids int64 [T, k])."""
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    grouped = choice.view(choice.shape[0], num_groups, -1)
    group_score = grouped.max(dim=-1).values if scoring == "softmax" else grouped.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_score).scatter_(1, torch.topk(group_score, top_groups, dim=-1).indices, 1.0)
    masked = grouped.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).view_as(choice)
    ids = torch.topk(masked, top_k, dim=-1).indices
    return scores.gather(1, ids), ids


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs grouped by expert (see ``torch_align_by_expert``): one Triton launch for
    decode-sized batches (at most ``ALIGN_KERNEL_MAX_PAIRS`` pairs; the torch version is some 25 small
    kernels, as long as the experts' GEMMs at batch 1), the torch version above that."""
    num_pairs = topk_ids.numel()
    if (triton is not None and 0 < num_pairs <= ALIGN_KERNEL_MAX_PAIRS
            and (topk_ids.is_cuda or envs.triton_interpret())):
        return triton_align_by_expert(topk_ids, num_experts, block_m)
    return torch_align_by_expert(topk_ids, num_experts, block_m)


ALIGN_KERNEL_MAX_PAIRS = 2048


def _capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    # Each touched expert's run ends in at most one partial tile: at most cdiv(pairs, block_m) full
    # tiles' worth plus one tile per touched expert (at most min(E, pairs) of them).
    return (-(-num_pairs // block_m) + min(num_experts, num_pairs)) * block_m


def triton_align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch_align_by_expert``'s result (bit for bit) from one single-program kernel."""
    flat = topk_ids.flatten()
    num_pairs, device = flat.numel(), flat.device
    capacity = _capacity(num_pairs, num_experts, block_m)
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    block_e = max(16, triton.next_power_of_2(num_experts))
    _align_kernel[(1,)](flat, sorted_ids, block_expert, num_padded, num_pairs, capacity,
                        NUM_EXPERTS=num_experts, BLOCK_E=block_e, BLOCK_M=block_m, BLOCK_P=max(16, 4096 // block_e),
                        BLOCK_T=64, num_warps=4, **pdl.launch_args(device))
    return sorted_ids, block_expert, num_padded


def torch_align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs ``p = token * k + slot`` grouped by expert, each expert's run padded to
    a multiple of ``block_m``.

    Returns ``sorted_ids`` int32 [capacity] (pair ids; padding holds T * k, which no pair has),
    ``block_expert`` int32 [capacity / block_m] (the expert of each tile; tiles past the end hold 0
    and are skipped) and ``num_padded`` int32 [1] (where the padded runs end). ``capacity`` =
    (cdiv(T * k, block_m) + min(E, T * k)) * block_m: enough for any routing, known without a sync
    (at decode batch 1 of Qwen3-MoE, 9 tiles rather than 121 for E * (block_m - 1) of padding)."""
    flat = topk_ids.flatten().to(torch.int64)
    num_pairs, device = flat.numel(), flat.device
    # scatter_add, not bincount: bincount sizes its output from the largest id (a device sync, and no
    # CUDA-graph capture).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)  # pair ids, by expert
    sorted_experts = flat[order]
    rank_in_expert = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank_in_expert
    capacity = _capacity(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    tile_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, tile_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_expert.to(torch.int32), padded_end[-1:].to(torch.int32)


if triton is not None:

    @triton.jit(do_not_specialize=["num_pairs", "capacity"])
    def _align_kernel(Ids, SortedIds, BlockExpert, NumPadded, num_pairs, capacity,
                      NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr):
        """One program: counts per expert, runs padded to BLOCK_M, then each pair's slot = its
        expert's run start + how many earlier pairs chose that expert (tiles of BLOCK_P pairs against
        the BLOCK_E experts, a running fill per expert), and each tile's expert."""
        pdl_prologue(PDL)
        experts = tl.arange(0, BLOCK_E)
        counts = tl.zeros([BLOCK_E], tl.int32)
        for p0 in range(0, num_pairs, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            ids = tl.load(Ids + offs, mask=offs < num_pairs, other=BLOCK_E).to(tl.int32)
            counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, axis=0)
        fill = ends - padded
        tl.store(NumPadded, tl.sum(padded, axis=0))
        for c0 in range(0, capacity, BLOCK_P):  # padding everywhere first
            offs = c0 + tl.arange(0, BLOCK_P)
            tl.store(SortedIds + offs, tl.zeros([BLOCK_P], tl.int32) + num_pairs, mask=offs < capacity)
        tl.debug_barrier()
        for p0 in range(0, num_pairs, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            ids = tl.load(Ids + offs, mask=offs < num_pairs, other=BLOCK_E).to(tl.int32)
            onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
            before = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of this tile with the same expert
            dest = tl.sum((before + fill[None, :]) * onehot, axis=1)
            tl.store(SortedIds + dest, offs.to(tl.int32), mask=offs < num_pairs)
            fill += tl.sum(onehot, axis=0)
        for t0 in range(0, capacity // BLOCK_M, BLOCK_T):  # a tile's expert: how many runs end at or before it
            tiles = t0 + tl.arange(0, BLOCK_T)
            done = ((tiles[:, None] * BLOCK_M >= ends[None, :]) & (experts[None, :] < NUM_EXPERTS)).to(tl.int32)
            expert = tl.minimum(tl.sum(done, axis=1), NUM_EXPERTS - 1)
            tl.store(BlockExpert + tiles, expert, mask=tiles < capacity // BLOCK_M)

    @triton.jit
    def _fused_moe_kernel(
        A, B, C, TopkWeights, SortedIds, BlockExpert, NumPadded,
        N, K, num_pairs,
        stride_am, stride_be, stride_bn, stride_bk, stride_cm,
        TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
    ):
        """Grid (capacity / BLOCK_M, cdiv(N, BLOCK_N)): tile m of the expert-sorted pairs times its
        expert's matrix. Row p of C (a pair) = A[p // TOP_K] @ B[expert]^T (B[e]: [N, K]), times
        TopkWeights[p] when MUL_WEIGHT. Padding entries (ids >= num_pairs) are neither read nor written."""
        pdl_prologue(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(NumPadded):
            return
        expert = tl.load(BlockExpert + pid_m).to(tl.int64)
        ids = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = ids < num_pairs
        rows = (ids // TOP_K).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        nmask = offs_n < N
        a_ptrs = A + rows[:, None] * stride_am + offs_k[None, :]
        b_ptrs = B + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk
        if MUL_WEIGHT:
            w = tl.load(TopkWeights + ids, mask=valid, other=0.0).to(tl.float32)
            acc = acc * w[:, None]
        c_ptrs = C + ids.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, topk_weights: Optional[torch.Tensor],
                  sorted_ids: torch.Tensor, block_expert: torch.Tensor, num_padded: torch.Tensor, top_k: int,
                  config: tuple[int, int, int, int, int]) -> None:
    """out[p] = a[p // top_k] @ w[expert(p)]^T (* topk_weights[p]) for every pair p; one launch."""
    block_m, block_n, block_k, warps, stages = config
    n, k = w.shape[1], w.shape[2]
    dot_f32 = a.dtype == torch.bfloat16 and envs.triton_interpret()  # the interpreter's bf16 dot is wrong
    grid = (sorted_ids.numel() // block_m, triton.cdiv(n, block_n))
    launch(
        _fused_moe_kernel, grid,
        a, w, out, topk_weights if topk_weights is not None else out, sorted_ids, block_expert, num_padded,
        n, k, out.shape[0], a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        TOP_K=top_k, MUL_WEIGHT=topk_weights is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PREC="ieee" if a.dtype == torch.float32 or dot_f32 else "tf32", DOT_F32=dot_f32,
        num_warps=warps, num_stages=stages, **pdl.launch_args(a.device))


def moe_config(num_tokens: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): small tiles for decode batches (few pairs
    per expert), larger for prefill. A starting point; tune on the GPU (docs/models.md)."""
    if num_tokens <= 32:
        return 16, 64, 64, 4, 4
    if num_tokens <= 512:
        return 32, 64, 64, 4, 4
    return 64, 128, 64, 8, 3


def triton_fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, config: Optional[tuple[int, int, int, int, int]] = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate | up); w2 [E, H, I]; topk_weights [T, k] (any float), topk_ids
    [T, k] -> sum_j topk_weights[t, j] * w2[e_j] @ (silu(gate) * up)(w13[e_j] @ x[t]): [T, H] in x.dtype."""
    from vllm_engine.layers import fused_ops

    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return torch.zeros_like(x)
    config = config or moe_config(num_tokens)
    x = x.contiguous()
    sorted_ids, block_expert, num_padded = align_by_expert(topk_ids, w13.shape[0], config[0])
    gate_up = torch.empty(num_tokens * top_k, w13.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, None, sorted_ids, block_expert, num_padded, top_k, config)
    act = fused_ops.triton_silu_and_mul(gate_up)
    out = torch.empty(num_tokens * top_k, w2.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, out, topk_weights.to(torch.float32).flatten().contiguous(), sorted_ids, block_expert,
                  num_padded, 1, config)
    return out.view(num_tokens, top_k, -1).sum(dim=1)


def torch_fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
    """The same as ``triton_fused_moe`` with torch ops: a loop over the experts that got tokens (the
    CPU path; HF's computation, in x.dtype)."""
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    hit = torch.unique(topk_ids)
    for e in hit.tolist():
        token, slot = torch.where(topk_ids == e)
        gate_up = F.linear(x[token], w13[e])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, w2[e]) * topk_weights[token, slot, None].to(x.dtype)
        out.index_add_(0, token, y)
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Triton for CUDA tensors, torch otherwise (see the module docstring)."""
    if triton is not None and x.is_cuda:
        return triton_fused_moe(x, w13, w2, topk_weights, topk_ids)
    return torch_fused_moe(x, w13, w2, topk_weights, topk_ids)


class FusedMoE(nn.Module):
    """``moe(x [T, H], router_logits [T, E]) -> [T, H]``: ``num_experts`` SwiGLU experts of
    ``intermediate_size``, the top ``top_k`` per token (weights renormalized when ``renormalize``).

    Checkpoint shards load through ``weight_loader(param, tensor, (expert, role))`` with role "gate",
    "up" (``w13_weight``, the [I, H] HF tensors) or "down" (``w2_weight``, [H, I]); each rank keeps its
    slice of each. ``reduce_results`` False: the caller sums the ranks' partial outputs (with a shared
    expert's, in one all-reduce)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, dtype: torch.dtype, reduce_results: bool = True, prefix: str = "") -> None:
        super().__init__()
        self.tp_group = get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.world_size
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.reduce_results = reduce_results
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.inter_per_rank = divide(intermediate_size, self.tp_size, f"expert intermediate size of {prefix or 'MoE'}")
        i_r = self.inter_per_rank
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * i_r, hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, i_r, dtype=dtype), requires_grad=False)
        gate_up = {(e, role): (intermediate_size, hidden_size) for e in range(num_experts) for role in ("gate", "up")}
        down = {(e, "down"): (hidden_size, intermediate_size) for e in range(num_experts)}
        set_weight_attrs(self.w13_weight, {"weight_loader": self.weight_loader, "checkpoint_shapes": gate_up})
        set_weight_attrs(self.w2_weight, {"weight_loader": self.weight_loader, "checkpoint_shapes": down})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: tuple[int, str]) -> None:
        """This rank's rows (gate, up) or columns (down) of expert ``shard_id[0]``'s HF tensor."""
        check_shape(param, loaded_weight, shard_id)
        expert, role = shard_id
        i_r, start = self.inter_per_rank, self.tp_rank * self.inter_per_rank
        if role == "down":
            param.data[expert].copy_(loaded_weight[:, start: start + i_r])
        else:
            offset = 0 if role == "gate" else i_r
            param.data[expert, offset: offset + i_r].copy_(loaded_weight[start: start + i_r])

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(x, *select_experts(router_logits, self.top_k, self.renormalize))

    def forward_routed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts for a routing chosen by the caller (DeepSeek's grouped top-k): [T, H]."""
        out = fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        if self.reduce_results and self.tp_size > 1:
            out = self.tp_group.all_reduce(out)
        return out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size} ({self.inter_per_rank} on rank {self.tp_rank})")
