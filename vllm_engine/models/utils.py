"""What every model file shares: pipeline-stage placeholders and the checkpoint-name bookkeeping of
``load_weights``."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from vllm_engine.layers.utils import default_weight_loader

# (our fused parameter, the HF name of one of its shards, shard id), matched on name fragments.
StackedParamsMapping = list[tuple[str, str, Union[int, str]]]


class PPMissingLayer(nn.Module):
    """A layer that lives on another pipeline stage: no parameters, never called."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this layer belongs to another pipeline stage")


def layer_sliding_window(config: Any, layer_idx: int) -> Optional[int]:
    """The attention window of layer ``layer_idx`` (None: full attention)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return None
    return window


def uniform_sliding_window(config: Any) -> Optional[int]:
    """The window every attention layer shares, or None (full attention somewhere, e.g. Gemma 2's
    global layers): only then may the KV cache free the blocks that fell out of the window."""
    windows = {layer_sliding_window(config, i) for i in range(config.num_hidden_layers)}
    return windows.pop() if len(windows) == 1 else None


def missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the model's ``PPMissingLayer`` s (``"model.layers.7."``...)."""
    return tuple(name + "." for name, m in model.named_modules() if isinstance(m, PPMissingLayer))


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapping: StackedParamsMapping,
                 skip: tuple[str, ...] = ()) -> set[str]:
    """Copies HF-named checkpoint tensors into ``model``'s parameters, each through its
    ``weight_loader`` (this rank's slice; a fused parameter's shard from ``mapping``). Tensors of
    layers on other pipeline stages, and names containing any of ``skip``, are passed over. Returns
    the checkpoint names loaded. ValueError naming the tensor for an unknown name or a wrong shape."""
    params = dict(model.named_parameters())
    elsewhere = missing_prefixes(model)
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(s in name for s in skip):
            continue
        target, shard_id = name, None
        for fused, hf, sid in mapping:
            if hf in name:
                target, shard_id = name.replace(hf, fused), sid
                break
        param = params.get(target)
        if param is None:
            if target.startswith(elsewhere):
                continue
            raise ValueError(f"Checkpoint tensor {name!r} matches no parameter of the model.")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"Weight {name} {e}.") from None
        loaded.add(name)
    return loaded


def expected_weights(model: nn.Module, mapping: StackedParamsMapping) -> set[str]:
    """The checkpoint names ``load_weights`` must see for every parameter on this stage to be filled."""
    names: set[str] = set()
    for name, _param in model.named_parameters():
        shards = [name.replace(fused, hf) for fused, hf, _sid in mapping if fused in name]
        names.update(shards or [name])
    return names
