"""Linear layers that own their weights, split across tensor-parallel ranks (vLLM's layers and names).

* ``ReplicatedLinear``: every rank holds the whole weight.
* ``ColumnParallelLinear``: output rows split across ranks (``gather_output``: all-gather the output).
* ``MergedColumnParallelLinear``: several column-parallel matrices stacked (gate | up): each rank
  holds its slice of each, stacked; shard ids 0, 1, ...
* ``QKVParallelLinear``: q | k | v, split by heads (shard ids ``"q"``, ``"k"``, ``"v"``). When there
  are fewer KV heads than ranks each KV head is replicated: rank r holds KV head
  ``r // (tp_size // num_kv_heads)``.
* ``RowParallelLinear``: input columns split across ranks; the partial outputs are summed with an
  all-reduce (``reduce_results``). The bias is added once, by rank 0's product, before the sum.

Each layer's parameters are created by its ``quant_method`` (quantization/base.py: the unquantized
method by default, cuBLAS or the measured Triton GEMV on CUDA) and carry a
``weight_loader(param, checkpoint_tensor, shard_id=None)`` that copies this rank's slice
(layers/utils.py). The tensor-parallel rank and size come from ``distributed.get_tp_group()`` when
the layer is built. At one rank nothing is communicated and the forward is the method's product.

Forward: ``layer(x [T, in]) -> [T, out]`` (this rank's columns for a column-parallel layer without
``gather_output``). Two more entry points fold the elementwise op before a projection into it
where the method can: ``forward_norm(x, residual, norm)`` (column-parallel layers: the residual add
and RMSNorm before q/k/v or gate/up) and ``forward_act(x, act_fn)`` (row-parallel: the SiLU-and-mul
before the down projection).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from vllm_engine.distributed import get_tp_group
from vllm_engine.distributed.utils import divide
from vllm_engine.layers.utils import check_shape, set_weight_attrs
from vllm_engine.quantization.base import LinearMethodBase, QuantizationConfig
from vllm_engine.quantization.unquantized import UnquantizedLinearMethod

ShardId = Union[int, str, None]


class LinearBase(nn.Module):
    """``input_size`` x ``output_size`` (the whole layer, all ranks together); ``quant_method`` from
    ``quant_config`` (None: unquantized, with a method of its own: pass a config so that every
    layer of a model shares one, as ``get_model`` does)."""

    def __init__(self, input_size: int, output_size: int, params_dtype: Optional[torch.dtype] = None,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.prefix = prefix
        self.tp_group = get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.world_size
        self.quant_method: LinearMethodBase = (quant_config.get_quant_method(self, prefix) if quant_config is not None
                                               else UnquantizedLinearMethod())

    def _make_bias(self, present: bool, size: int, output_dim: Optional[int],
                   shapes: dict[ShardId, tuple[int, ...]]) -> None:
        """``bias`` [size] (this rank's part), loaded from checkpoint tensors of ``shapes``; None
        when the layer has none (``present`` false)."""
        if not present:
            self.register_parameter("bias", None)
            return
        bias = nn.Parameter(torch.empty(size, dtype=self.params_dtype), requires_grad=False)
        set_weight_attrs(bias, {"output_dim": output_dim, "weight_loader": self.weight_loader,
                                "checkpoint_shapes": shapes})
        self.register_parameter("bias", bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        raise NotImplementedError

    def checkpoint_rows(self, param: nn.Parameter, shard_id: ShardId = None) -> Optional[tuple[int, int]]:
        """Rows [start, stop) of dim 0 of the checkpoint tensor (shard ``shard_id`` of ``param``) that
        ``weight_loader`` reads on this rank, when only those (a loader may leave the rest unread);
        None: it reads the whole tensor."""
        return None

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.tp_rank}/{self.tp_size}"


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, params_dtype: Optional[torch.dtype] = None,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        super().__init__(input_size, output_size, params_dtype, quant_config, prefix)
        self.quant_method.create_weights(self, input_size, [output_size], input_size, output_size, self.params_dtype,
                                         weight_loader=self.weight_loader,
                                         checkpoint_shapes={None: (output_size, input_size)})
        self._make_bias(bias, output_size, None, {None: (output_size,)})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        check_shape(param, loaded_weight)
        param.data.copy_(loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output rows split across ranks: rank r holds rows [r * out / tp, (r + 1) * out / tp) of every
    matrix in ``output_sizes`` (default: the one matrix of ``output_size`` rows)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False,
                 params_dtype: Optional[torch.dtype] = None, quant_config: Optional[QuantizationConfig] = None,
                 output_sizes: Optional[list[int]] = None, prefix: str = "") -> None:
        super().__init__(input_size, output_size, params_dtype, quant_config, prefix)
        self.gather_output = gather_output
        if output_sizes is None:
            output_sizes = [output_size]
        self.output_sizes = output_sizes
        self.output_partition_sizes = self._partition_sizes()
        self.output_size_per_partition = sum(self.output_partition_sizes)
        self.quant_method.create_weights(self, input_size, self.output_partition_sizes, input_size, output_size,
                                         self.params_dtype, weight_loader=self.weight_loader,
                                         checkpoint_shapes=self._checkpoint_shapes((input_size,)))
        self._make_bias(bias, self.output_size_per_partition, 0, self._checkpoint_shapes(()))

    def _partition_sizes(self) -> list[int]:
        return [divide(size, self.tp_size, f"output size of {self.prefix or type(self).__name__}")
                for size in self.output_sizes]

    def _checkpoint_shapes(self, rest: tuple[int, ...]) -> dict[ShardId, tuple[int, ...]]:
        return {None: (self.output_size,) + rest}

    def _shard(self, shard_id: ShardId) -> tuple[int, int, int]:
        """(row offset in this rank's parameter, rows, which slice of the checkpoint tensor to take)."""
        return 0, self.output_size_per_partition, self.tp_rank

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        check_shape(param, loaded_weight, shard_id)
        output_dim = getattr(param, "output_dim", None)
        if output_dim is None:  # not split (a quantization method's per-layer scalar)
            param.data.copy_(loaded_weight)
            return
        offset, size, src_rank = self._shard(shard_id)
        if getattr(param, "packed_dim", None) == output_dim:  # int32 words holding pack_factor rows each
            offset, size = offset // param.pack_factor, size // param.pack_factor
        param.data.narrow(output_dim, offset, size).copy_(loaded_weight.narrow(output_dim, src_rank * size, size))

    def checkpoint_rows(self, param: nn.Parameter, shard_id: ShardId = None) -> Optional[tuple[int, int]]:
        """The rows ``weight_loader`` narrows to, when it splits dim 0 (see ``LinearBase``)."""
        if self.tp_size == 1 or getattr(param, "output_dim", None) != 0:
            return None
        _, size, src_rank = self._shard(shard_id)
        if getattr(param, "packed_dim", None) == 0:
            size //= param.pack_factor
        return src_rank * size, (src_rank + 1) * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        if self.gather_output and self.tp_size > 1:
            out = self.tp_group.all_gather(out, dim=-1)
        return out

    def forward_norm(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                     norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(norm(x + residual)), x + residual)``, the norm folded into the product where the
        quant method can; ``residual`` None (the first layer): ``(self(norm(x)), x)``."""
        if residual is None:
            out, residual = self.quant_method.apply(self, norm(x), self.bias), x
        else:
            out, residual = self.quant_method.apply_add_norm(self, x, residual, norm, self.bias)
        if self.gather_output and self.tp_size > 1:
            out = self.tp_group.all_gather(out, dim=-1)
        return out, residual


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel matrices of ``output_sizes`` rows stacked in one weight (gate | up): each rank
    holds its slice of each, in order. Checkpoint shard ``i`` is the i-th matrix."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True, gather_output: bool = False,
                 params_dtype: Optional[torch.dtype] = None, quant_config: Optional[QuantizationConfig] = None,
                 prefix: str = "") -> None:
        super().__init__(input_size, sum(output_sizes), bias, gather_output, params_dtype, quant_config,
                         output_sizes=list(output_sizes), prefix=prefix)

    def _checkpoint_shapes(self, rest: tuple[int, ...]) -> dict[ShardId, tuple[int, ...]]:
        return {i: (size,) + rest for i, size in enumerate(self.output_sizes)}

    def _shard(self, shard_id: ShardId) -> tuple[int, int, int]:
        offset = sum(self.output_partition_sizes[:shard_id])
        return offset, self.output_partition_sizes[shard_id], self.tp_rank


class QKVParallelLinear(ColumnParallelLinear):
    """q | k | v projections of ``total_num_heads`` query heads and ``total_num_kv_heads`` KV heads of
    ``head_size``, split by heads: this rank has ``num_heads`` q heads and ``num_kv_heads`` KV heads
    (one, replicated ``num_kv_head_replicas`` times across ranks, when there are fewer than ranks)."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: Optional[int] = None, bias: bool = True,
                 params_dtype: Optional[torch.dtype] = None, quant_config: Optional[QuantizationConfig] = None,
                 prefix: str = "") -> None:
        self.hidden_size = hidden_size
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp_size = get_tp_group().world_size
        self.num_heads = divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= self.total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, self.total_num_kv_heads,
                                               "tensor-parallel size over the number of KV heads")
        else:
            self.num_kv_heads = divide(self.total_num_kv_heads, tp_size, "number of KV heads")
            self.num_kv_head_replicas = 1
        q_total, kv_total = total_num_heads * head_size, self.total_num_kv_heads * head_size
        self.checkpoint_sizes = {"q": q_total, "k": kv_total, "v": kv_total}
        # The sizes of the stacked matrices as if every rank's KV heads were distinct (vLLM's
        # convention): each divides by the tensor-parallel size into this rank's rows.
        kv_rows = self.num_kv_heads * tp_size * head_size
        super().__init__(hidden_size, q_total + 2 * kv_rows, bias, False, params_dtype, quant_config,
                         output_sizes=[q_total, kv_rows, kv_rows], prefix=prefix)

    def _checkpoint_shapes(self, rest: tuple[int, ...]) -> dict[ShardId, tuple[int, ...]]:
        return {shard: (size,) + rest for shard, size in self.checkpoint_sizes.items()}

    def _shard(self, shard_id: ShardId) -> tuple[int, int, int]:
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        if shard_id == "q":
            return 0, q, self.tp_rank
        offset = q if shard_id == "k" else q + kv
        return offset, kv, self.tp_rank // self.num_kv_head_replicas


class RowParallelLinear(LinearBase):
    """Input columns split across ranks: rank r holds columns [r * in / tp, (r + 1) * in / tp) and
    multiplies its part of the input (``input_is_parallel``: x is already that part, as a
    column-parallel layer's output is); ``reduce_results``: the partial outputs are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = True,
                 reduce_results: bool = True, params_dtype: Optional[torch.dtype] = None,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        super().__init__(input_size, output_size, params_dtype, quant_config, prefix)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_size_per_partition = divide(input_size, self.tp_size, f"input size of {prefix or 'a row layer'}")
        self.quant_method.create_weights(self, self.input_size_per_partition, [output_size], input_size, output_size,
                                         self.params_dtype, weight_loader=self.weight_loader,
                                         checkpoint_shapes={None: (output_size, input_size)})
        self._make_bias(bias, output_size, None, {None: (output_size,)})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        check_shape(param, loaded_weight, shard_id)
        input_dim = getattr(param, "input_dim", None)
        if input_dim is not None:
            size = param.shape[input_dim]
            loaded_weight = loaded_weight.narrow(input_dim, self.tp_rank * size, size)
        param.data.copy_(loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_size > 1:  # this rank's columns of a whole input
            x = x.narrow(-1, self.tp_rank * self.input_size_per_partition, self.input_size_per_partition)
        out = self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        if self.reduce_results and self.tp_size > 1:
            out = self.tp_group.all_reduce(out)
        return out

    def forward_act(self, x: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
        """``self(act_fn(x))``, the activation folded into the product where the quant method can
        (``x``: this rank's [gate | up] columns for SiLU-and-mul)."""
        out = self.quant_method.apply_act(self, x, act_fn, self.bias if self.tp_rank == 0 else None)
        if self.reduce_results and self.tp_size > 1:
            out = self.tp_group.all_reduce(out)
        return out


__all__ = ["ColumnParallelLinear", "LinearBase", "MergedColumnParallelLinear", "QKVParallelLinear",
           "ReplicatedLinear", "RowParallelLinear"]
