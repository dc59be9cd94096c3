"""One-pass temperature sampling on the GPU (the common case: temperature only, no filters).

The Gumbel-max trick: ``argmax(logits / T + G)`` with ``G = -log(-log(U))``, U uniform, draws a token
with probability ``softmax(logits / T)`` (the same law as the exponential race in sampler.py). One
Triton program per row streams over the vocabulary once, keeping the running best: no softmax, no
[B, V] temporaries. Rows with temperature 0 take the plain argmax. The random numbers come from
Triton's Philox generator keyed by a per-step seed, so this path is for unseeded requests only.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None


if triton is not None:

    @triton.jit
    def _gumbel_argmax_kernel(logits_ptr, stride_row, temp_ptr, out_ptr, vocab_size, seed,
                              BLOCK: tl.constexpr):
        row = tl.program_id(0)
        t = tl.load(temp_ptr + row)
        greedy = t <= 0.0
        inv_t = 1.0 / tl.where(greedy, 1.0, t)
        noise_scale = tl.where(greedy, 0.0, 1.0)
        best_val = -float("inf")
        best_idx = 0
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        for start in range(0, vocab_size, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < vocab_size
            x = tl.load(row_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
            u = tl.rand(seed, row * vocab_size + offs)
            gumbel = -tl.log(-tl.log(u + 1e-20) + 1e-20)
            score = x * inv_t + gumbel * noise_scale
            score = tl.where(mask & (x > -float("inf")), score, -float("inf"))
            blk_max = tl.max(score, axis=0)
            blk_idx = tl.argmax(score, axis=0) + start
            better = blk_max > best_val
            best_idx = tl.where(better, blk_idx, best_idx)
            best_val = tl.where(better, blk_max, best_val)
        tl.store(out_ptr + row, best_idx.to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int, block: int = 2048) -> torch.Tensor:
    """logits: [B, V] (any float dtype, last dim contiguous); temperature: [B] float32, 0 = greedy.
    Returns [B] int64 token ids, each drawn from softmax(logits / T) (argmax where T == 0)."""
    if triton is None:
        raise RuntimeError("triton is not available")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        _gumbel_argmax_kernel[(num_rows,)](logits, logits.stride(0), temperature.to(torch.float32).contiguous(),
                                           out, vocab, seed, BLOCK=block, num_warps=8)
    return out
