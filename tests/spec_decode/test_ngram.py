"""n-gram prompt lookup: the batched numpy proposer against a plain loop over each context."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_engine.spec_decode.ngram import NgramProposer, propose_ngrams


def lookup_loop(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The definition: the longest suffix (max_n down to min_n tokens) that also ends at an earlier
    position (before the last token); its earliest such occurrence; the up to k tokens after it."""
    L = len(tokens)
    if k <= 0:
        return []
    for n in range(min(max_n, L), min_n - 1, -1):
        suffix = tokens[L - n:]
        for end in range(n - 1, L - 1):
            if tokens[end - n + 1: end + 1] == suffix:
                return tokens[end + 1: end + 1 + k]
    return []


@pytest.mark.parametrize("min_n, max_n", [(1, 1), (1, 3), (2, 4), (3, 3), (2, 6)])
def test_batch_matches_plain_loop(min_n, max_n):
    rng = np.random.default_rng(min_n * 10 + max_n)
    contexts, caps = [], []
    for _ in range(300):
        L = int(rng.integers(1, 60))
        vocab = int(rng.integers(2, 8))  # small vocabularies: many (and overlapping) matches
        contexts.append(rng.integers(0, vocab, L).tolist())
        caps.append(int(rng.integers(0, 6)))
    got = propose_ngrams([np.array(c) for c in contexts], min_n, max_n, caps)
    expected = [lookup_loop(c, min_n, max_n, k) for c, k in zip(contexts, caps)]
    assert got == expected
    assert sum(map(bool, expected)) > 50  # the comparison covered many proposals


def test_examples():
    # "a b c d a b" -> suffix "a b" occurred at 0..1 -> propose "c d a"
    assert propose_ngrams([np.array([1, 2, 3, 4, 1, 2])], 1, 3, [3]) == [[3, 4, 1]]
    # The longest match wins over an earlier shorter one: suffix "7 1 2" matches at 4..6, "1 2" at 0..1.
    assert propose_ngrams([np.array([1, 2, 9, 9, 7, 1, 2, 5, 7, 1, 2])], 2, 3, [2]) == [[5, 7]]
    # No match of min_n tokens, and a context too short.
    assert propose_ngrams([np.array([1, 2, 3, 4]), np.array([5])], 1, 2, [3, 3]) == [[], []]
    # The proposal stops at the context's end.
    assert propose_ngrams([np.array([4, 4])], 1, 1, [5]) == [[4]]


def test_proposer_buffers_follow_appends():
    prop = NgramProposer(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)
    rng = np.random.default_rng(0)
    seqs = {f"r{i}": rng.integers(0, 4, 5).tolist() for i in range(4)}
    for step in range(80):
        ids = [rid for rid in seqs if step % 7 != int(rid[1])]  # some requests sit out some steps
        got = prop.propose(ids, [seqs[r] for r in ids], [3] * len(ids))
        assert got == [lookup_loop(seqs[r], 1, 3, 3) for r in ids]
        for r in seqs:
            seqs[r].extend(rng.integers(0, 4, int(rng.integers(1, 4))).tolist())
    assert len(prop._buffers) <= len(seqs)
