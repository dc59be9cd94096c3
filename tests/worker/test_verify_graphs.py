"""Verify graphs (worker/cuda_graphs.py): a step whose sequences have up to q query tokens each,
padded to q rows per sequence and to the batch bucket, gives the unpadded eager forward's hidden
states and writes the same K/V (and nothing for the padded rows). On the CPU the padded forward
runs eagerly (``run_verify_eager``, what a replay computes) with the torch reference and the Triton
kernels (interpreted; the backend as a speculating engine builds it: its multi-query decode for up
to q rows a sequence); on a GPU the captured graphs replay it."""

from __future__ import annotations

import pytest
import torch

from tests.worker.metadata_helpers import step_metadata
from vllm_engine.attention.backend import AttentionMetadata, get_attn_backend
from vllm_engine.config import EngineArgs
from vllm_engine.layers.attention import Attention
from vllm_engine.model_loader import get_model
from vllm_engine.worker.cuda_graphs import CUDAGraphRunner

BLOCK = 4
MAX_LEN = 64
Q = 3  # two proposals and the last token


def _metadata(starts: list[int], counts: list[int], tables: list[list[int]], device) -> AttentionMetadata:
    return step_metadata(starts, counts, tables, BLOCK, device)


def _setup(tiny_model_dir, device: torch.device, backend: str, num_seqs: int):
    cfg = EngineArgs(model=str(tiny_model_dir("llama")), dtype="float32", device=device.type,
                     max_model_len=MAX_LEN).create_engine_config().model
    torch.manual_seed(0)
    model = get_model(cfg, device, get_attn_backend(device, backend, multi_query_len=Q))
    num_blocks = (MAX_LEN // BLOCK) * num_seqs + 1
    layers = sum(1 for _ in model.model.stage_layers)
    caches = [torch.zeros(2, num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim, device=device) for _ in range(layers)]
    # Blocks 1.. in order per sequence; block 0 is the padding sequences' (never written).
    per_seq = MAX_LEN // BLOCK
    tables = [[1 + i * per_seq + j for j in range(per_seq)] for i in range(num_seqs)]
    return cfg, model, caches, tables


def _prefill(model, cfg, caches, tables, lens, device, gen):
    """Each sequence's first ``lens[i]`` tokens into ``caches``; returns the sequences' tokens."""
    seqs = [torch.randint(3, cfg.vocab_size, (MAX_LEN,), generator=gen).tolist() for _ in lens]
    meta = _metadata([0] * len(lens), lens, tables, device)
    ids = torch.tensor([t for s, n in zip(seqs, lens) for t in s[:n]], device=device)
    pos = torch.tensor([p for n in lens for p in range(n)], device=device)
    with torch.inference_mode():
        model(ids, pos, caches, meta)
    return seqs


def _step(seqs, starts, counts, tables, device):
    meta = _metadata(starts, counts, tables, device)
    ids = torch.tensor([seqs[i][p] for i, (s, c) in enumerate(zip(starts, counts)) for p in range(s, s + c)],
                       device=device)
    pos = torch.tensor([p for s, c in zip(starts, counts) for p in range(s, s + c)], device=device)
    return ids, pos, meta


CASES = [([5], [3]), ([5, 9, 14], [3, 1, 2]), ([7, 2, 11, 4, 20], [2, 3, 3, 1, 1])]


def _check(tiny_model_dir, device, backend, starts, counts, graphed: bool):
    cfg, model, caches, tables = _setup(tiny_model_dir, device, backend, len(starts))
    gen = torch.Generator().manual_seed(1)
    seqs = _prefill(model, cfg, caches, tables, starts, device, gen)
    ref_caches = [c.clone() for c in caches]
    runner = CUDAGraphRunner(model, caches, 8, MAX_LEN, BLOCK, cfg.hf_config.hidden_size, torch.float32, device,
                             verify_query_len=Q, max_num_batched_tokens=64)
    if graphed:
        runner.capture()
    ids, pos, meta = _step(seqs, starts, counts, tables, device)
    assert runner.verify_bucket(meta) == next(bs for bs in runner.verify_batch_sizes if bs >= len(starts))
    with torch.inference_mode():
        ref = model(ids, pos, ref_caches, meta)
        if graphed:
            assert runner.fits(meta)
            out = runner.run(ids, pos, meta)
        else:
            out = runner.run_verify_eager(ids, pos, meta)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # The same K/V in every slot: the real rows' written, the padded rows' nowhere.
    for got, want in zip(caches, ref_caches):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("starts,counts", CASES)
def test_padded_verify_forward_matches_unpadded(tiny_model_dir, backend, starts, counts):
    _check(tiny_model_dir, torch.device("cpu"), backend, starts, counts, graphed=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("starts,counts", CASES)
def test_verify_graph_replay_matches_eager(tiny_model_dir, starts, counts):
    _check(tiny_model_dir, torch.device("cuda"), "triton", starts, counts, graphed=True)


def test_verify_bucket_refuses_what_no_graph_holds(tiny_model_dir):
    cpu = torch.device("cpu")
    cfg, model, caches, tables = _setup(tiny_model_dir, cpu, "torch", 1)
    runner = CUDAGraphRunner(model, caches, 16, MAX_LEN, BLOCK, cfg.hf_config.hidden_size, torch.float32, cpu,
                             verify_query_len=Q, max_num_batched_tokens=24)
    assert runner.verify_batch_sizes == [1, 2, 4, 8]  # 16 sequences x 3 rows exceed the 24 tokens
    assert runner.verify_bucket(_metadata([5], [3], tables, cpu)) == 1
    assert runner.verify_bucket(_metadata([5], [4], tables, cpu)) is None  # more rows than q
    assert runner.verify_bucket(_metadata([5], [1], tables, cpu)) is None  # a decode: the decode graphs
    assert runner.verify_bucket(_metadata([MAX_LEN - 3], [2], tables, cpu)) is None  # its padding could pass max_model_len (checked conservatively)
    assert runner.verify_bucket(_metadata([MAX_LEN - 4], [2], tables, cpu)) == 1
    nine = _metadata([5] * 9, [2] * 9, tables * 9, cpu)
    assert runner.verify_bucket(nine) is None  # no verify graph for 9 sequences
    assert not runner.fits(_metadata([5], [3], tables, cpu))  # nothing captured
    plain = CUDAGraphRunner(model, caches, 16, MAX_LEN, BLOCK, cfg.hf_config.hidden_size, torch.float32, cpu)
    assert plain.verify_batch_sizes == [] and plain.verify_bucket(_metadata([5], [3], tables, cpu)) is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_verify_forward_with_two_kv_cache_groups(tiny_model_dir, backend):
    """A model with two KV cache groups (as Gemma 2/3's sliding and full layers): the last layer
    reads group 1, whose blocks are numbered differently; the padded forward copies each group's
    slots and tables, so outputs and every layer's K/V equal the unpadded forward's."""
    cpu = torch.device("cpu")
    starts, counts = [5, 9, 14], [3, 1, 2]
    cfg, model, caches, tables = _setup(tiny_model_dir, cpu, backend, len(starts))
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    layers[-1].kv_cache_group = 1
    top = max(b for row in tables for b in row)
    group1 = [[top + 1 - b for b in row] for row in tables]  # the same blocks, numbered backwards

    def grouped(meta, s, c):
        other = _metadata(s, c, group1, cpu)
        return meta.with_groups(torch.stack([meta.block_tables, other.block_tables]),
                                torch.stack([meta.slot_mapping, other.slot_mapping]))

    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, cfg.vocab_size, (MAX_LEN,), generator=gen).tolist() for _ in starts]
    ids = torch.tensor([t for s, n in zip(seqs, starts) for t in s[:n]])
    pos = torch.tensor([p for n in starts for p in range(n)])
    with torch.inference_mode():
        model(ids, pos, caches, grouped(_metadata([0] * 3, starts, tables, cpu), [0] * 3, starts))
    ref_caches = [c.clone() for c in caches]
    runner = CUDAGraphRunner(model, caches, 8, MAX_LEN, BLOCK, cfg.hf_config.hidden_size, torch.float32, cpu,
                             num_kv_groups=2, verify_query_len=Q, max_num_batched_tokens=64)
    ids, pos, meta = _step(seqs, starts, counts, tables, cpu)
    meta = grouped(meta, starts, counts)
    with torch.inference_mode():
        ref = model(ids, pos, ref_caches, meta)
        out = runner.run_verify_eager(ids, pos, meta)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(caches, ref_caches):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
