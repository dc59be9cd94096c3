"""The KV budget of the memory profile (worker/kv_cache.kv_budget), with device numbers worked out by
hand: gpu_memory_utilization is this engine's own share of the device, as in vLLM (two engines at
0.45 share a GPU), and a share the device cannot hold is a ValueError naming the setting."""

from __future__ import annotations

import pytest

from vllm_engine.worker.kv_cache import DeviceMemory, kv_budget

GB = 10**9
T = 100 * GB  # the device
CONTEXT = 1 * GB  # the CUDA context: outside torch, there before the engine's first tensor


def started_with(held: int) -> DeviceMemory:
    """The device when an engine starts, with ``held`` bytes of another engine's tensors in this process."""
    return DeviceMemory(allocated=held, reserved=held, free=T - CONTEXT - held, total=T)


def test_alone_the_budget_is_the_share_less_weights_activations_and_workspaces():
    # 16 GB of weights live, 2 GB of the allocator's segments unused, 0.5 GB of cuBLAS workspace.
    after = DeviceMemory(allocated=16 * GB, reserved=18 * GB, free=T - CONTEXT - 18 * GB - GB // 2, total=T)
    peak = 19 * GB  # the weights and the profile's 3 GB of activations
    assert kv_budget(started_with(0), after, peak, 0.9) == 90 * GB - 19 * GB - GB // 2  # 70.5 GB


def test_unused_allocator_memory_is_not_counted_as_used():
    # A quantizing load left 4 GB of segments that a live tensor pins: reserved but not handed out.
    after = DeviceMemory(allocated=5 * GB, reserved=9 * GB, free=T - CONTEXT - 9 * GB, total=T)
    assert kv_budget(started_with(0), after, 6 * GB, 0.9) == 84 * GB


def test_two_engines_at_045_share_the_device():
    first = 45 * GB  # the first engine's weights and KV cache, live in this process
    after = DeviceMemory(allocated=first + 2 * GB, reserved=first + 2 * GB, free=T - CONTEXT - first - 2 * GB,
                         total=T)
    # its own 2 GB of weights and 1 GB of activations: 45 - 3 = 42 GB (the old rule, which counted the
    # first engine's 45 GB against this one's share too, left nothing)
    assert kv_budget(started_with(first), after, first + 3 * GB, 0.45) == 42 * GB


def test_a_share_the_device_cannot_hold_names_the_setting():
    first = 45 * GB
    after = DeviceMemory(allocated=first + 2 * GB, reserved=first + 2 * GB, free=T - CONTEXT - first - 2 * GB,
                         total=T)
    # share 90 - 3 = 87 GB; free for it 52 - 1 = 51 GB: 36 GB short, so at most 0.9 - 0.36 = 0.54
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.9 .* at most 0\.54"):
        kv_budget(started_with(first), after, first + 3 * GB, 0.9)
