"""One-pass temperature sampling on the GPU (the common case: temperature only, no filters).

The Gumbel-max trick: ``argmax(logits / T + G)`` with ``G = -log(-log(U))``, U uniform, draws a token
with probability ``softmax(logits / T)`` (the same law as the exponential race in sampler.py). Triton
programs stream over the vocabulary once (each a chunk of a row), keeping the running best: no softmax, no
[B, V] temporaries. Rows with temperature 0 take the plain argmax. The random numbers come from
Triton's Philox generator keyed by a per-step seed, so this path is for unseeded requests only.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None


if triton is not None:

    @triton.jit
    def _gumbel_update(row_ptr, offs, hi, u, inv_t, noise_scale, best_val, best_idx):
        """Folds the tokens ``offs`` (uniforms ``u``) into the per-lane running best: elementwise, no
        reduction per tile. A lane sees its tokens in increasing order and keeps the first on ties."""
        mask = offs < hi
        x = tl.load(row_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
        gumbel = -tl.log(-tl.log(u + 1e-20) + 1e-20)
        score = x * inv_t + gumbel * noise_scale
        score = tl.where(mask & (x > -float("inf")), score, -float("inf"))
        better = score > best_val
        return tl.where(better, score, best_val), tl.where(better, offs, best_idx)

    @triton.jit
    def _gumbel_argmax_kernel(logits_ptr, stride_row, temp_ptr, best_val_ptr, best_idx_ptr, vocab_size, chunk,
                              seed, num_chunks, tiles_per_row, BLOCK: tl.constexpr):
        """Grid (rows, chunks): the best Gumbel score of one chunk of one row's vocabulary.

        A tile of BLOCK tokens takes its uniforms from BLOCK / 4 Philox calls (``tl.rand4x``: four
        numbers per call). The counter is (row, tile, lane), so a token's noise depends on (seed, row,
        token) only, not on the chunking (chunks are whole tiles). Each of the BLOCK / 4 lanes keeps
        its own best over the chunk; one reduction at the end picks the best lane (the lowest token
        on ties), so a tie anywhere goes to the first token."""
        QUARTER: tl.constexpr = BLOCK // 4
        row = tl.program_id(0)
        c = tl.program_id(1)
        t = tl.load(temp_ptr + row)
        greedy = t <= 0.0
        inv_t = 1.0 / tl.where(greedy, 1.0, t)
        noise_scale = tl.where(greedy, 0.0, 1.0)
        lane = tl.arange(0, QUARTER)
        best_val = tl.full([QUARTER], -float("inf"), tl.float32)
        best_idx = tl.zeros([QUARTER], tl.int32)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        lo = c * chunk
        hi = tl.minimum(lo + chunk, vocab_size)
        for start in range(lo, hi, BLOCK):
            u0, u1, u2, u3 = tl.rand4x(seed, (row * tiles_per_row + start // BLOCK) * QUARTER + lane)
            best_val, best_idx = _gumbel_update(row_ptr, start + lane, hi, u0, inv_t, noise_scale, best_val, best_idx)
            best_val, best_idx = _gumbel_update(row_ptr, start + QUARTER + lane, hi, u1, inv_t, noise_scale,
                                                best_val, best_idx)
            best_val, best_idx = _gumbel_update(row_ptr, start + 2 * QUARTER + lane, hi, u2, inv_t, noise_scale,
                                                best_val, best_idx)
            best_val, best_idx = _gumbel_update(row_ptr, start + 3 * QUARTER + lane, hi, u3, inv_t, noise_scale,
                                                best_val, best_idx)
        top = tl.max(best_val, axis=0)
        # Lanes that never saw a finite score keep index 0 and -inf: a chunk of only -inf reports lo.
        first = tl.min(tl.where(best_val == top, best_idx, 2147483647), axis=0)
        first = tl.where(top == -float("inf"), lo, first)
        tl.store(best_val_ptr + row * num_chunks + c, top)
        tl.store(best_idx_ptr + row * num_chunks + c, first)

    @triton.jit
    def _chunk_argmax_kernel(best_val_ptr, best_idx_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr):
        """One program per row: the chunk with the best score (the first one on ties) gives the token."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK_C)
        vals = tl.load(best_val_ptr + row * num_chunks + offs, mask=offs < num_chunks, other=-float("inf"))
        i = tl.argmax(vals, axis=0)
        tl.store(out_ptr + row, tl.load(best_idx_ptr + row * num_chunks + i).to(tl.int64))


def gumbel_num_warps(block: int) -> int:
    """Warps for a tile of ``block`` tokens: its four quarters are loaded one at a time, so 8 tokens
    (16 bytes of bf16) per thread per load keeps the loads vectorized: block / 4 / 8 threads."""
    return max(1, min(8, block // 1024))


def num_chunks(num_rows: int, vocab: int, block: int, target_programs: int = 2048) -> int:
    """Vocabulary chunks per row: enough programs to fill the GPU (about ``target_programs``), but
    no chunk shorter than one block."""
    return max(1, min(triton.cdiv(vocab, block), triton.cdiv(target_programs, max(num_rows, 1))))


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int, block: int = 2048,
                  chunks: Optional[int] = None) -> torch.Tensor:
    """logits: [B, V] (any float dtype, last dim contiguous); temperature: [B] float32, 0 = greedy.
    Returns [B] int64 token ids, each drawn from softmax(logits / T) (argmax where T == 0).

    Two launches: each (row, vocabulary chunk) program keeps its best score, then one program per
    row picks the best chunk. The noise depends only on (seed, row, token), not on the chunking."""
    if triton is None:
        raise RuntimeError("triton is not available")
    if block < 4 or block & (block - 1):
        raise ValueError(f"block must be a power of 2 >= 4 (four uniforms per Philox call), got {block}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        n = chunks or num_chunks(num_rows, vocab, block)
        chunk = triton.cdiv(triton.cdiv(vocab, n), block) * block
        n = triton.cdiv(vocab, chunk)
        best_val = torch.empty(num_rows, n, dtype=torch.float32, device=logits.device)
        best_idx = torch.empty(num_rows, n, dtype=torch.int32, device=logits.device)
        _gumbel_argmax_kernel[(num_rows, n)](logits, logits.stride(0), temperature.to(torch.float32).contiguous(),
                                             best_val, best_idx, vocab, chunk, seed, n, triton.cdiv(vocab, block),
                                             BLOCK=block, num_warps=gumbel_num_warps(block))
        _chunk_argmax_kernel[(num_rows,)](best_val, best_idx, out, n, BLOCK_C=max(2, triton.next_power_of_2(n)))
    return out
