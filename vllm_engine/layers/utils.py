"""Parameter attributes the loaders read (vLLM's convention).

A layer's parameter carries, as plain attributes:

* ``weight_loader(param, loaded_weight, shard_id=None)``: copies this rank's part of the checkpoint
  tensor ``loaded_weight`` (the whole HF tensor) into ``param``; ``shard_id`` names which of the HF
  tensors of a fused parameter it is (``"q"``/``"k"``/``"v"``, or 0/1 for gate/up).
* ``checkpoint_shapes``: ``{shard_id: shape}`` of the HF tensors it is loaded from (the whole
  tensors, before slicing): the loaders check shapes against it, and dummy weights are drawn at
  these shapes and sliced, so every rank holds its slice of the same weights.
* ``output_dim`` / ``input_dim``: the dimension split across tensor-parallel ranks, if any.
* ``checkpoint_name`` (rare): the checkpoint tensor's name when it is not the parameter's (a tied LM
  head on a pipeline stage without the embedding): dummy weights are seeded by it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def set_weight_attrs(param: torch.Tensor, attrs: Optional[dict[str, Any]]) -> None:
    """Sets each of ``attrs`` on ``param`` (refusing to overwrite one already set)."""
    for key, value in (attrs or {}).items():
        if hasattr(param, key):
            raise AttributeError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


def check_shape(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """ValueError("has shape (..), expected (..)") unless ``loaded_weight`` is the HF tensor
    ``param.checkpoint_shapes[shard_id]`` (default: the parameter's own shape)."""
    shapes = getattr(param, "checkpoint_shapes", None)
    want = shapes.get(shard_id) if shapes is not None else tuple(param.shape)
    if want is None:
        raise ValueError(f"has no shard {shard_id!r} (shards: {', '.join(map(repr, shapes))})")
    if tuple(loaded_weight.shape) != tuple(want):
        raise ValueError(f"has shape {tuple(loaded_weight.shape)}, expected {tuple(want)}")


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """The whole tensor, as is (a replicated parameter: norms, biases of row-parallel layers)."""
    check_shape(param, loaded_weight, shard_id)
    param.data.copy_(loaded_weight)


def checkpoint_shapes(param: torch.Tensor) -> dict[Any, tuple[int, ...]]:
    """``param.checkpoint_shapes``, or ``{None: param.shape}`` for a parameter loaded whole."""
    return getattr(param, "checkpoint_shapes", None) or {None: tuple(param.shape)}
