"""The one-pass Gumbel-max sampler (layers/triton_sampler.py) under the Triton interpreter:
its draws follow softmax(logits / T) (chi-square against a float64 reference), temperature-0 rows
are the argmax, and -inf logits are never drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_engine.layers.triton_sampler import gumbel_sample

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/kernels/conftest.py)


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_draws_follow_softmax_of_logits_over_temperature():
    torch.manual_seed(0)
    vocab, rows, temp = 6, 500, 0.7
    logits = torch.randn(vocab) * 0.6  # each reachable token expected 11+ times; draws at T = 1: chi2 ~46
    logits[4] = float("-inf")
    batch = logits.repeat(rows, 1).to(DEV)
    # Rows are independent draws (each row has its own Philox offsets); block 4 < vocab covers the tile loop.
    draws = gumbel_sample(batch, torch.full((rows,), temp, device=DEV), seed=1234, block=4).cpu().numpy()
    counts = np.bincount(draws, minlength=vocab).astype(np.float64)
    probs = torch.softmax(logits.double() / temp, dim=-1).numpy()
    assert counts[4] == 0
    # 4 degrees of freedom (5 reachable tokens): P(chi2 > 23.5) is about 1e-4.
    assert _chi_square(counts, probs) < 23.5
    # Another seed gives other draws.
    again = gumbel_sample(batch[:50], torch.full((50,), temp, device=DEV), seed=99, block=4).cpu().numpy()
    assert not np.array_equal(again, draws[:50])


def test_temperature_zero_rows_are_argmax_in_a_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, 40, device=DEV)
    temps = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 2.0], device=DEV)
    out = gumbel_sample(logits, temps, seed=7, block=16)
    greedy = temps == 0
    assert torch.equal(out[greedy], logits[greedy].argmax(-1))
    assert out.dtype == torch.int64 and bool(((out >= 0) & (out < 40)).all())


def test_draws_do_not_depend_on_the_chunking_and_bf16_logits_match_float32():
    torch.manual_seed(2)
    rows, vocab = 5, 50
    logits = torch.randn(rows, vocab, device=DEV).to(torch.bfloat16)
    temps = torch.tensor([0.8, 0.0, 1.3, 0.5, 1.0], device=DEV)
    one = gumbel_sample(logits.float(), temps, seed=11, block=8, chunks=1)
    for chunks in (2, 3, 7):
        assert torch.equal(gumbel_sample(logits.float(), temps, seed=11, block=8, chunks=chunks), one)
    # bf16 logits are read as their float32 values: the same draws.
    assert torch.equal(gumbel_sample(logits, temps, seed=11, block=8, chunks=3), one)


def test_greedy_ties_across_chunks_pick_the_first_token():
    logits = torch.zeros(2, 40, device=DEV)
    logits[0, [9, 30]] = 5.0  # a tie in chunks 0 and 1 (block 16 => chunks of 16)
    logits[1, [35, 20]] = 3.0
    out = gumbel_sample(logits, torch.zeros(2, device=DEV), seed=0, block=16, chunks=3)
    assert out.tolist() == [9, 20] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("block", [2, 6, 100])
def test_block_must_be_a_power_of_two_of_at_least_four(block):
    with pytest.raises(ValueError, match="block"):
        gumbel_sample(torch.zeros(1, 8, device=DEV), torch.ones(1, device=DEV), seed=0, block=block)
