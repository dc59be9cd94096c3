"""n-gram prompt lookup: propose the tokens that followed an earlier occurrence of the context's end.

For each request, the longest suffix of its tokens (``prompt_lookup_max`` down to
``prompt_lookup_min`` tokens) that also occurs earlier in its tokens (prompt and output) is looked
up; the up to k tokens that followed its earliest occurrence are the proposal (as vLLM's n-gram
proposer: longest match, then earliest). Runs on the host in numpy, over the whole batch at once:
the contexts are concatenated, the positions holding each context's last token are found in one
pass, and only those candidates' matches are extended backwards: O(total tokens + candidates x
max_n) a step.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_NO_MATCH = np.iinfo(np.int64).max


def propose_ngrams(contexts: Sequence[np.ndarray], min_n: int, max_n: int,
                   max_drafts: Sequence[int]) -> list[list[int]]:
    """Proposals for a batch: ``contexts[i]`` int64 token ids of request i (prompt + output),
    ``max_drafts[i]`` the most tokens to propose for it (0: none). Returns one list per request:
    the tokens after the earliest earlier occurrence of its longest matching suffix of length
    ``min_n..max_n``, at most ``max_drafts[i]`` of them (fewer when the context ends first); [] when
    no suffix of ``min_n`` tokens occurs earlier.

    The candidates are the earlier positions holding the context's last token (one pass over the
    batch); each candidate's match is then extended backwards, ``max_n - 1`` comparisons over the
    candidates only."""
    out: list[list[int]] = [[] for _ in contexts]
    lens = np.fromiter((len(c) for c in contexts), dtype=np.int64, count=len(contexts))
    caps = np.asarray(max_drafts, dtype=np.int64)
    # A match must end before the last token and be at least min_n long: min_n + 1 tokens at least.
    live = np.flatnonzero((lens > min_n) & (caps > 0))
    if not live.size:
        return out
    lens_l = lens[live]
    flat = np.concatenate([np.asarray(contexts[i], dtype=np.int64) for i in live])
    starts = np.zeros(live.size, dtype=np.int64)
    np.cumsum(lens_l[:-1], out=starts[1:])
    last = starts + lens_l - 1  # each context's last token
    seg = np.repeat(np.arange(live.size), lens_l)
    cand = np.flatnonzero((flat == flat[last][seg]) & (np.arange(flat.size) < last[seg]))
    if not cand.size:
        return out
    cseg = seg[cand]
    cpos = cand - starts[cseg]  # where each candidate match ends, inside its context
    length = np.ones(cand.size, dtype=np.int64)  # tokens matched so far, backwards from there
    alive = np.ones(cand.size, dtype=bool)
    for back in range(1, max_n):
        alive &= cpos >= back  # an earlier token to compare (the suffix's exists: it ends later)
        alive[alive] = flat[cand[alive] - back] == flat[last[cseg[alive]] - back]
        if not alive.any():
            break
        length += alive
    # Per context with candidates: the longest match, and its earliest end.
    first = np.flatnonzero(np.r_[True, cseg[1:] != cseg[:-1]])
    best = np.maximum.reduceat(length, first)
    is_best = length == np.repeat(best, np.diff(np.r_[first, cand.size]))
    end = np.minimum.reduceat(np.where(is_best, cpos, _NO_MATCH), first)
    for j, n, e in zip(cseg[first].tolist(), best.tolist(), end.tolist()):
        if n < min_n:
            continue
        i = int(live[j])
        stop = min(e + 1 + int(caps[i]), int(lens_l[j]))
        out[i] = flat[starts[j] + e + 1: starts[j] + stop].tolist()
    return out


class NgramProposer:
    """Keeps each request's tokens in a numpy buffer (appending only the new ones each step) and
    proposes for a batch with ``propose_ngrams``."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.k = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self._buffers: dict[str, tuple[np.ndarray, int]] = {}  # request id -> (capacity array, filled)

    def propose(self, req_ids: Sequence[str], token_ids: Sequence[list[int]],
                max_drafts: Sequence[int]) -> list[list[int]]:
        """``token_ids[i]``: request i's tokens (prompt + output, all known: no placeholder), only
        ever appended to between calls. ``max_drafts[i]``: its cap (k at most). Buffers of requests
        not in this call are dropped."""
        contexts = [self._context(rid, toks) for rid, toks in zip(req_ids, token_ids)]
        if len(self._buffers) > len(req_ids):
            keep = set(req_ids)
            self._buffers = {rid: b for rid, b in self._buffers.items() if rid in keep}
        caps = [min(self.k, c) for c in max_drafts]
        return propose_ngrams(contexts, self.min_n, self.max_n, caps)

    def _context(self, req_id: str, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        buf, filled = self._buffers.get(req_id, (None, 0))
        if buf is None or buf.size < n:
            grown = np.empty(max(2 * n, 64), dtype=np.int64)
            if buf is not None:
                grown[:filled] = buf[:filled]
            buf = grown
        # The last known token is copied again: cheap, and safe should it have been a placeholder.
        filled = max(0, min(filled, n) - 1)
        buf[filled:n] = tokens[filled:n]
        self._buffers[req_id] = (buf, n)
        return buf[:n]
