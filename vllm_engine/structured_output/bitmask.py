"""The token bitmask: one int32 word per 32 token ids; bit ``t % 32`` of word ``t // 32`` set means
token ``t`` is allowed (xgrammar's layout). Applied to the logits on their device, in torch."""

from __future__ import annotations

import torch

_WORD_BITS: dict[torch.device, torch.Tensor] = {}  # per device: [32] int32, bit i of each word alone


def bitmask_width(vocab_size: int) -> int:
    """Words per bitmask row for ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Returns ``logits`` with every token that ``bitmask`` disallows set to -inf in the given rows.

    logits: [B, V] any float dtype; bitmask: [R, W] int32 on logits' device, where W < ceil(V / 32)
    blocks every token past 32 W (a model's padding past the grammars' vocabulary); rows: [R] int64,
    distinct (which rows of logits the bitmask rows constrain; the other rows are untouched).
    R == B means every row in order (rows is 0 .. B-1, as the model runner builds it) and ``rows``
    is not read. Out of place: ``logits`` itself is never modified (the sampler's contract). No host
    sync; three kernels when every row is constrained, five otherwise (one more with padding).
    """
    vocab = logits.shape[1]
    blocked = (bitmask.unsqueeze(-1) & _word_bits(bitmask.device)).eq(0).view(bitmask.shape[0], -1)[:, :vocab]
    if blocked.shape[1] < vocab:
        blocked = torch.cat([blocked, blocked.new_ones(blocked.shape[0], vocab - blocked.shape[1])], dim=1)
    if bitmask.shape[0] == logits.shape[0]:
        return logits.masked_fill(blocked, float("-inf"))
    masked = logits.index_select(0, rows).masked_fill_(blocked, float("-inf"))
    return logits.index_copy(0, rows, masked)


def _word_bits(device: torch.device) -> torch.Tensor:
    bits = _WORD_BITS.get(device)
    if bits is None:
        bits = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)
        _WORD_BITS[device] = bits
    return bits
