"""KV cache groups: the attention layers that share one block table per request.

A model whose layers all attend alike (every layer full attention, or every layer the same sliding
window) has one group: one block table per request, as always. A hybrid model mixes kinds (Gemma 2
alternates sliding-window and full layers, Gemma 3 has five sliding layers per full one): a
sliding-window layer needs only the last ``sliding_window`` tokens' K/V, a full layer needs them
all, so the two kinds cannot share a table if the sliding layers are to give back what fell out of
their window.

The layers are therefore split into groups of one kind and **equal size** (vLLM's KV cache groups):
every group has its own block table per request, all groups draw blocks from one pool, and a block
id means the same memory in every group: ``group_size`` per-layer KV tensors, the j-th layer of
every group reading and writing tensor j. Since one block belongs to one group's table at a time,
the layers that share a tensor never touch the same block. The group size is the layer count of
the rarest kind (Gemma 2: half the layers; Gemma 3: its full layers), so the full-attention layers
form whole groups, and a group of the commoner kind that comes out short simply leaves its last
tensors unused in its own blocks.

Nothing here imports torch: the scheduler (which never touches a tensor) and the model runner both
read these plain tuples. ``layer_ids`` index the decoder's attention layers in model order (global
indices, across pipeline stages); a second model sharing the pool (a draft model) may append its
layers after the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers ``layer_ids`` (attention layers in model order) attending with ``sliding_window``
    (None: full attention); the layer at position j of ``layer_ids`` uses KV tensor j."""

    layer_ids: tuple[int, ...]
    sliding_window: Optional[int] = None


def make_kv_cache_groups(layer_windows: Sequence[Optional[int]]) -> tuple[KVCacheGroup, ...]:
    """The groups of layers with windows ``layer_windows`` (one entry per attention layer; None: full
    attention). One kind: a single group of every layer. Several: groups of one kind and of the
    size of the rarest kind, full-attention groups first, then sliding ones by window."""
    if not layer_windows:
        raise ValueError("a model needs at least one attention layer")
    by_kind: dict[Optional[int], list[int]] = {}
    for i, window in enumerate(layer_windows):
        by_kind.setdefault(window, []).append(i)
    if len(by_kind) == 1:
        (window, layers), = by_kind.items()
        return (KVCacheGroup(tuple(layers), window),)
    size = min(len(layers) for layers in by_kind.values())
    groups = []
    for window in sorted(by_kind, key=lambda w: -1 if w is None else w):
        layers = by_kind[window]
        groups.extend(KVCacheGroup(tuple(layers[k:k + size]), window) for k in range(0, len(layers), size))
    return tuple(groups)


def layer_group_slots(groups: Sequence[KVCacheGroup], num_layers: int) -> list[tuple[int, int]]:
    """For each attention layer 0..num_layers-1: (its group's index, its KV tensor index in the group).
    ValueError if the groups do not cover every layer exactly once."""
    slots: list[Optional[tuple[int, int]]] = [None] * num_layers
    for g, group in enumerate(groups):
        for j, layer in enumerate(group.layer_ids):
            if not 0 <= layer < num_layers or slots[layer] is not None:
                raise ValueError(f"KV cache group {g} names layer {layer} twice or out of range ({num_layers} layers)")
            slots[layer] = (g, j)
    missing = [i for i, s in enumerate(slots) if s is None]
    if missing:
        raise ValueError(f"attention layers {missing} are in no KV cache group")
    return slots  # type: ignore[return-value]
