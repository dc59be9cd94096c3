"""The token bitmask: one int32 word per 32 token ids; bit ``t % 32`` of word ``t // 32`` set means
token ``t`` is allowed (xgrammar's layout). Applied to the logits on their device, in torch."""

from __future__ import annotations

import torch


def bitmask_width(vocab_size: int) -> int:
    """Words per bitmask row for ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Returns ``logits`` with every token that ``bitmask`` disallows set to -inf in the given rows.

    logits: [B, V] any float dtype; bitmask: [R, W] int32 with W >= ceil(V / 32), on logits' device;
    rows: [R] int64 (which rows of logits the bitmask rows constrain; the other rows are untouched).
    Out of place: ``logits`` itself is never modified (the sampler's contract). No host sync.
    """
    vocab = logits.shape[1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()
    masked = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy(0, rows, masked)
