"""``checkpoint_rows``: the rows of a checkpoint tensor a layer's ``weight_loader`` reads on one rank
(a staged load reads only those). Checked against the loaders themselves: given the tensor with every
other row NaN, each rank's parameter holds no NaN and exactly its slice; and a tp=2 model lists the
rows of its column-parallel weights and vocabulary, none of the row-parallel ones."""

from __future__ import annotations

import pytest
import torch

from vllm_engine.distributed import override_parallel_state
from vllm_engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm_engine.layers.utils import checkpoint_shapes
from vllm_engine.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding


def build(cls, tp_rank: int, tp_size: int, *args, **kwargs):
    with override_parallel_state(tp_rank=tp_rank, tp_size=tp_size):
        return cls(*args, params_dtype=torch.float32, **kwargs)


LAYERS = [
    (ColumnParallelLinear, (8, 12), dict(bias=True)),
    (MergedColumnParallelLinear, (8, [12, 12]), dict(bias=False)),
    (QKVParallelLinear, (8, 4, 6, 2), dict(bias=True)),  # 6 q heads, 2 kv heads
    (RowParallelLinear, (12, 8), dict(bias=True)),
    (VocabParallelEmbedding, (100, 8), {}),
    (ParallelLMHead, (100, 8), {}),
]


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("cls,args,kwargs", LAYERS, ids=[c.__name__ for c, _, _ in LAYERS])
def test_rows_are_what_the_loader_reads(cls, args, kwargs, tp):
    if cls is QKVParallelLinear and tp == 3:
        args = (8, 4, 6, 1)  # one kv head for three ranks: each reads it
    if cls is QKVParallelLinear and tp == 4:
        args = (8, 4, 8, 2)  # two kv heads for four ranks: each read by two
    g = torch.Generator().manual_seed(tp)
    for rank in range(tp):
        layer = build(cls, rank, tp, *args, **kwargs)
        for name, param in layer.named_parameters():
            for shard_id, shape in checkpoint_shapes(param).items():
                full = torch.randn(shape, generator=g)
                rows = layer.checkpoint_rows(param, shard_id)
                if tp == 1 or cls is RowParallelLinear and name == "weight":
                    assert rows is None
                if rows is None:
                    continue
                start, stop = rows
                assert 0 <= start <= stop <= shape[0]
                holey = torch.full_like(full, float("nan"))
                holey[start:stop] = full[start:stop]
                load(param, full, shard_id)
                whole = param.detach().clone()
                load(param, holey, shard_id)
                assert not param.isnan().any(), (cls.__name__, name, shard_id, rank)
                assert torch.equal(param, whole)


def load(param: torch.nn.Parameter, tensor: torch.Tensor, shard_id) -> None:
    """The parameter reset, then ``tensor`` loaded through its weight_loader."""
    param.data.fill_(0.5)
    if shard_id is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard_id)
