"""vllm_engine.utils."""

from __future__ import annotations

import gc
import weakref

from vllm_engine.utils import freeze_gc


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cycle collector frees it


def test_freeze_gc_keeps_frozen_cycles_out_of_collections_until_unfrozen():
    try:
        before = Node()
        alive = weakref.ref(before)
        frozen = freeze_gc()
        assert frozen >= 1 and gc.get_freeze_count() == frozen
        del before
        gc.collect()
        assert alive() is not None  # frozen: the full collection did not even look at it
        after = Node()
        dead = weakref.ref(after)
        del after
        gc.collect()
        assert dead() is None  # objects made after the freeze are collected as usual
    finally:
        gc.unfreeze()
    gc.collect()
    assert alive() is None and gc.get_freeze_count() == 0
