"""The tensor-parallel layers, one simulated rank at a time (``override_parallel_state``, no processes):
each rank holds exactly its slice of every checkpoint tensor, and the ranks' partial products put
together (concatenated or summed, as the collectives would) give the whole layer's product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_engine.distributed import get_pp_indices, kv_heads_per_rank, override_parallel_state
from vllm_engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm_engine.layers.vocab_parallel_embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding

GEN = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def build(cls, tp_rank: int, tp_size: int, *args, **kwargs):
    with override_parallel_state(tp_rank=tp_rank, tp_size=tp_size):
        return cls(*args, params_dtype=torch.float32, **kwargs)


def rows(t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    n = t.shape[0] // tp
    return t[rank * n: (rank + 1) * n]


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_column_parallel_holds_its_rows_and_the_outputs_concatenate(tp):
    w, b, x = randn(12, 5), randn(12), randn(4, 5)
    outs = []
    for r in range(tp):
        layer = build(ColumnParallelLinear, r, tp, 5, 12, bias=True)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        assert torch.equal(layer.weight, rows(w, r, tp)) and torch.equal(layer.bias, rows(b, r, tp))
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, -1), F.linear(x, w, b))


@pytest.mark.parametrize("tp", [2, 3])
def test_merged_column_parallel_holds_its_slice_of_each_shard(tp):
    gate, up, x = randn(6, 4), randn(6, 4), randn(3, 4)
    outs = []
    for r in range(tp):
        layer = build(MergedColumnParallelLinear, r, tp, 4, [6, 6], bias=False)
        layer.weight.weight_loader(layer.weight, up, 1)  # any order
        layer.weight.weight_loader(layer.weight, gate, 0)
        assert torch.equal(layer.weight, torch.cat([rows(gate, r, tp), rows(up, r, tp)]))
        outs.append(layer(x))
    # Each rank's output is [its gate columns | its up columns]: the activation pairs them up locally.
    want_gate, want_up = F.linear(x, gate), F.linear(x, up)
    torch.testing.assert_close(torch.cat([o[:, : 6 // tp] for o in outs], -1), want_gate)
    torch.testing.assert_close(torch.cat([o[:, 6 // tp:] for o in outs], -1), want_up)


@pytest.mark.parametrize("heads,kv_heads,tp", [
    (4, 2, 2),   # KV heads split
    (9, 3, 3),   # SmolLM2's 9 / 3 over 3 ranks
    (6, 3, 3),
    (8, 2, 4),   # fewer KV heads than ranks: each replicated on 2 ranks
    (6, 1, 3),   # MQA: the one KV head on every rank
    (4, 4, 1),
])
def test_qkv_parallel_holds_its_heads_and_replicates_kv_heads(heads, kv_heads, tp):
    d, hidden = 4, 8
    q, k, v = randn(heads * d, hidden), randn(kv_heads * d, hidden), randn(kv_heads * d, hidden)
    qb, kb, vb = randn(heads * d), randn(kv_heads * d), randn(kv_heads * d)
    per_kv = kv_heads_per_rank(kv_heads, tp)
    for r in range(tp):
        layer = build(QKVParallelLinear, r, tp, hidden, d, heads, kv_heads, bias=True)
        assert layer.num_heads == heads // tp and layer.num_kv_heads == per_kv
        for shard, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            layer.weight.weight_loader(layer.weight, w, shard)
            layer.bias.weight_loader(layer.bias, b, shard)
        first_kv = r * kv_heads // tp  # the rank's first KV head (vLLM's rule)
        kv_rows = slice(first_kv * d, (first_kv + per_kv) * d)
        want = torch.cat([rows(q, r, tp), k[kv_rows], v[kv_rows]])
        assert torch.equal(layer.weight, want)
        assert torch.equal(layer.bias, torch.cat([rows(qb, r, tp), kb[kv_rows], vb[kv_rows]]))


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_row_parallel_holds_its_columns_and_the_outputs_sum_with_the_bias_once(tp):
    w, b, x = randn(5, 12), randn(5), randn(4, 12)
    total = 0
    for r in range(tp):
        layer = build(RowParallelLinear, r, tp, 12, 5, bias=True, reduce_results=False)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        n = 12 // tp
        assert torch.equal(layer.weight, w[:, r * n: (r + 1) * n]) and torch.equal(layer.bias, b)
        total = total + layer(x[:, r * n: (r + 1) * n])
    torch.testing.assert_close(total, F.linear(x, w, b))


def test_row_parallel_takes_its_columns_of_a_whole_input_and_folds_the_activation():
    from vllm_engine.layers.activation import SiluAndMul, silu_and_mul

    w, gate_up = randn(5, 6), randn(3, 12)
    layer = build(RowParallelLinear, 1, 2, 6, 5, bias=False, input_is_parallel=False, reduce_results=False)
    layer.weight.weight_loader(layer.weight, w)
    x = randn(3, 6)
    torch.testing.assert_close(layer(x), F.linear(x[:, 3:], w[:, 3:]))
    full = build(RowParallelLinear, 0, 1, 6, 5, bias=False)
    full.weight.weight_loader(full.weight, w)
    torch.testing.assert_close(full.forward_act(gate_up, SiluAndMul()), F.linear(silu_and_mul(gate_up), w))


def test_forward_norm_is_the_norm_then_the_product():
    from vllm_engine.layers.layernorm import RMSNorm, rms_norm

    layer = build(ReplicatedLinear, 0, 1, 8, 3, bias=True)
    w, b = randn(3, 8), randn(3)
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.weight_loader(layer.bias, b)
    norm = RMSNorm(8, 1e-6, torch.float32)
    norm.weight.weight_loader(norm.weight, randn(8))
    x, res = randn(2, 8), randn(2, 8)
    col = build(ColumnParallelLinear, 0, 1, 8, 3, bias=True)
    col.weight.weight_loader(col.weight, w)
    col.bias.weight_loader(col.bias, b)
    out, new_res = col.forward_norm(x, res, norm)
    h, s = rms_norm(x, norm.weight, 1e-6, res)
    torch.testing.assert_close(out, F.linear(h, w, b))
    assert torch.equal(new_res, s)
    out, same = col.forward_norm(x, None, norm)  # the first layer: no residual yet
    torch.testing.assert_close(out, F.linear(rms_norm(x, norm.weight, 1e-6), w, b))
    assert same is x
    torch.testing.assert_close(layer(x), F.linear(x, w, b))


def test_shapes_are_checked_against_the_whole_checkpoint_tensor():
    layer = build(QKVParallelLinear, 1, 2, 8, 4, 4, 2, bias=False)
    with pytest.raises(ValueError, match=r"has shape \(4, 8\), expected \(8, 8\)"):
        layer.weight.weight_loader(layer.weight, randn(4, 8), "k")
    with pytest.raises(ValueError, match="no shard"):
        layer.weight.weight_loader(layer.weight, randn(16, 8))
    with pytest.raises(ValueError, match="number of attention heads"):
        build(QKVParallelLinear, 0, 3, 8, 4, 4, 2)
    with pytest.raises(ValueError, match="KV heads"):
        build(QKVParallelLinear, 0, 4, 8, 4, 8, 3)
    with pytest.raises(ValueError, match="output size"):
        build(ColumnParallelLinear, 0, 2, 8, 5)


class SumGroup:
    """Stands in for the TP group of one simulated rank: records what would be all-reduced."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.reduced = rank, world_size, None

    def all_reduce(self, x):
        self.reduced = x
        return x


@pytest.mark.parametrize("tp", [2, 3])
def test_vocab_parallel_embedding_pads_splits_and_sums_to_the_lookup(tp):
    vocab, dim = 100, 6
    w = randn(vocab, dim)
    ids = torch.tensor([0, 5, 63, 64, 99, 42, 99])
    padded = -(-vocab // (64 * tp)) * 64 * tp
    total = 0
    for r in range(tp):
        emb = build(VocabParallelEmbedding, r, tp, vocab, dim)
        assert emb.num_embeddings_padded == padded and emb.weight.shape == (padded // tp, dim)
        emb.weight.weight_loader(emb.weight, w)
        start = r * padded // tp
        real = max(min(start + padded // tp, vocab) - start, 0)
        assert torch.equal(emb.weight[:real], w[start: start + real]) and not emb.weight[real:].any()
        emb.tp_group = SumGroup(r, tp)
        total = total + emb(ids)
    assert torch.equal(total, F.embedding(ids, w))


def test_one_rank_has_no_padding_and_a_plain_lookup_and_product():
    emb = build(VocabParallelEmbedding, 0, 1, 100, 6)
    head = build(ParallelLMHead, 0, 1, 100, 6)
    w = randn(100, 6)
    emb.weight.weight_loader(emb.weight, w)
    head.weight.weight_loader(head.weight, w)
    assert emb.weight.shape == (100, 6)
    ids, h = torch.tensor([3, 99]), randn(2, 6)
    assert torch.equal(emb(ids), F.embedding(ids, w))
    assert torch.equal(LogitsProcessor(100)(head, h), F.linear(h, w))
    assert torch.equal(LogitsProcessor(100)(emb, h), F.linear(h, w))  # tied: the embedding is the head


def test_lm_head_slices_put_side_by_side_give_the_logits():
    vocab, dim, tp = 100, 6, 2
    w, h = randn(vocab, dim), randn(3, dim)
    parts = []
    for r in range(tp):
        head = build(ParallelLMHead, r, tp, vocab, dim)
        head.weight.weight_loader(head.weight, w)
        parts.append(head.quant_method.apply(head, h))
    torch.testing.assert_close(torch.cat(parts, -1)[:, :vocab], F.linear(h, w))
    assert not torch.cat(parts, -1)[:, vocab:].any()  # the padding columns


def test_pipeline_layer_ranges_cover_the_model_in_order():
    assert [get_pp_indices(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [get_pp_indices(6, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 6)]
    assert get_pp_indices(4, 0, 1) == (0, 4)
    with pytest.raises(ValueError):
        get_pp_indices(2, 0, 3)
